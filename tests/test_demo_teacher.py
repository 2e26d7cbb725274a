"""The demo teacher (``builtin:shapes-hovle``): HoVLE export round trip, deterministic training,
the built-in registration, and (slow) the full build's held-out accuracy."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import mmdistill
from mmdistill.data.synthetic import generate_samples
from mmdistill.demo.teacher import (
    BUILTIN_NAME,
    DEMO_KINDS,
    SHIPPED_DIR,
    ShapesTeacherConfig,
    build_shapes_teacher,
    config_with_overrides,
    evaluate_answers,
    shipped_teacher,
    train_teacher,
    write_hovle_checkpoint,
)
from mmdistill.errors import TeacherError
from mmdistill.teachers.hovle_export import to_hovle_state_dict
from mmdistill.teachers.tiny_hovle import tiny_hovle_state_dict, write_tiny_hovle
from mmdistill.tokenizer import load_tokenizer

TINY = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    num_embedding_layers=1,
    num_llm_layers=2,
    n_images=24,
    text_lines=8,
    steps=5,
    batch_size=4,
    caption_batch_size=2,
    text_batch_size=2,
    warmup_front_end_steps=2,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)  # the build must not depend on (or disturb) the global RNG
    return train_teacher(ShapesTeacherConfig(**TINY))


def test_export_round_trips_exactly_through_load_teacher(tiny, tmp_path):
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():  # every weight distinct, so a swapped or mis-packed tensor shows
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    write_hovle_checkpoint(dataclasses.replace(tiny, model=model), tmp_path)
    loaded = mmdistill.load_teacher(str(tmp_path))
    assert loaded.config.teacher["adapter"] == "hovle"
    assert loaded.config.layer_types == model.config.layer_types
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def test_export_has_hovle_names_shapes_and_config(tiny, tmp_path):
    write_hovle_checkpoint(tiny, tmp_path / "ours")
    write_tiny_hovle(tmp_path / "fixture", **dataclasses.asdict(tiny.config.sizes()))
    written = load_file(str(tmp_path / "ours" / "model.safetensors"))
    vocab = tiny.tokenizer.vocab_size
    reference = tiny_hovle_state_dict(tiny.config.sizes(), vocab)
    assert {k: tuple(v.shape) for k, v in written.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }
    assert any(k.endswith("attention.wqkv.weight") for k in written)
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    fixture = json.loads((tmp_path / "fixture" / "config.json").read_text())
    assert ours.keys() == fixture.keys()
    assert ours["embedding_config"].keys() == fixture["embedding_config"].keys()
    assert ours["llm_config"].keys() == fixture["llm_config"].keys()
    assert ours["embedding_config"]["llm_vocab_size"] == vocab
    assert ours["embedding_config"]["img_context_token_id"] == tiny.tokenizer.token_to_id(
        "<IMG_CONTEXT>"
    )
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "ours" / name).exists()


def test_grouped_wqkv_layout(tiny):
    """Rows of ``wqkv`` are [kv head][its q heads, k, v][head_dim] (GUIDE §2)."""
    model = tiny.model
    attention = model.layers[0].mixer
    d, kv = attention.head_dim, attention.num_kv_heads
    group = attention.num_heads // kv
    wqkv = to_hovle_state_dict(model)["embedding_model.encoder.0.attention.wqkv.weight"]
    rows = wqkv.reshape(kv, group + 2, d, -1)
    q = attention.q_proj.weight.reshape(kv, group, d, -1)
    torch.testing.assert_close(rows[:, :group], q, rtol=0, atol=0)
    torch.testing.assert_close(rows[:, group], attention.k_proj.weight.reshape(kv, d, -1))
    torch.testing.assert_close(rows[:, group + 1], attention.v_proj.weight.reshape(kv, d, -1))


def test_training_is_deterministic(tiny):
    again = train_teacher(ShapesTeacherConfig(**TINY))
    assert len(again.losses) == TINY["steps"]
    assert again.losses == tiny.losses
    assert again.tokenizer_model == tiny.tokenizer_model
    ours, theirs = tiny.model.state_dict(), again.model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def test_builtin_shapes_hovle_is_the_shipped_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDISTILL_CACHE", str(tmp_path))
    teacher = mmdistill.load_teacher(f"builtin:{BUILTIN_NAME}")
    assert teacher.config.teacher["adapter"] == "hovle"
    assert teacher.config.teacher["directory"] == str(SHIPPED_DIR.resolve())
    assert not (tmp_path / "builtin").exists()  # nothing trained or copied on first use


def test_overrides_are_checked():
    assert config_with_overrides("steps=7,lr=0.01,kinds=count|size").steps == 7
    assert config_with_overrides("kinds=count|size").kinds == ("count", "size")
    with pytest.raises(TeacherError, match="unknown"):
        config_with_overrides("stepz=7")
    with pytest.raises(TeacherError, match="steps"):
        config_with_overrides("steps=many")


@pytest.mark.slow
def test_full_build_answers_held_out_questions(tmp_path):
    record = build_shapes_teacher(tmp_path)
    teacher = mmdistill.load_teacher(str(tmp_path))
    tokenizer = load_tokenizer(tmp_path)
    held_out = generate_samples(200, 0, split="eval", kinds=DEMO_KINDS)
    result = evaluate_answers(teacher, tokenizer, held_out)
    assert result["accuracy"] >= 0.8, (result, record)


def test_shipped_teacher_is_current():
    """The repository's copy was built with today's default config."""
    shipped = shipped_teacher()
    assert shipped == SHIPPED_DIR, "the shipped teacher is missing or built from another config"
    record = json.loads((shipped / "shapes_teacher.json").read_text())
    assert record["config"] == ShapesTeacherConfig().to_dict()
