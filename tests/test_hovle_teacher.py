"""HoVLE teacher: the native model against a direct re-implementation of the HoVLE format
written from the raw tensors (docs/hovle_format.md), plus seeding and generation with images."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from generation_harness import check_cached_generation
from safetensors.torch import load_file

import mmdistill
from mmdistill.frontends.hovle import chat_prompt, prepare_images
from mmdistill.frontends.hovle_vision import (
    HoVLEVisionConfig,
    HoVLEVisionFrontEnd,
    extract_front_end_state,
)
from mmdistill.teachers.tiny_hovle import write_tiny_hovle
from mmdistill.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def hovle_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hovle")
    write_tiny_hovle(directory, seed=0)
    return directory


def reference_forward(directory, input_ids, pixel_values):
    """HoVLE forward straight from the checkpoint's tensors: no mmdistill decoder code."""
    cfg = json.loads((directory / "config.json").read_text())
    w = load_file(str(directory / "model.safetensors"))
    emb_cfg, llm_cfg = cfg["embedding_config"], cfg["llm_config"]
    front = HoVLEVisionFrontEnd(HoVLEVisionConfig.from_embedding_config(emb_cfg)).double()
    front.load_state_dict({k: v.double() for k, v in extract_front_end_state(w).items()})
    x = front.embed_inputs(input_ids, pixel_values.double(), emb_cfg["img_context_token_id"])

    def rms(h, weight, eps):
        return weight.double() * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    def layer(h, prefix, c):
        heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
        d = c["hidden_size"] // heads
        group = heads // kv
        L = h.shape[1]
        a = rms(h, w[prefix + "attention_norm.weight"], c["rms_norm_eps"])
        qkv = (a @ w[prefix + "attention.wqkv.weight"].double().T).view(1, L, kv, group + 2, d)
        q = qkv[:, :, :, :group].reshape(1, L, heads, d)
        k = qkv[:, :, :, group].repeat_interleave(group, dim=2)
        v = qkv[:, :, :, group + 1].repeat_interleave(group, dim=2)
        base = c["rope_theta"]
        scaling = c.get("rope_scaling") or {}
        if scaling.get("type") == "dynamic" and L > c["max_position_embeddings"]:
            f = scaling["factor"]
            base = base * ((f * L / c["max_position_embeddings"]) - (f - 1)) ** (d / (d - 2))
        # InternLM2 computes the rotary angles in float32 whatever the model dtype.
        inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
        ang = torch.arange(L).float()[:, None] * inv
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos().double()[:, None], ang.sin().double()[:, None]

        def rot(t):
            t1, t2 = t[..., : d // 2], t[..., d // 2 :]
            return t * cos + torch.cat([-t2, t1], -1) * sin

        q, k = rot(q), rot(k)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -torch.inf)
        o = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(1, L, heads * d)
        h = h + o @ w[prefix + "attention.wo.weight"].double().T
        f = rms(h, w[prefix + "ffn_norm.weight"], c["rms_norm_eps"])
        gate = F.silu(f @ w[prefix + "feed_forward.w1.weight"].double().T)
        up = f @ w[prefix + "feed_forward.w3.weight"].double().T
        return h + (gate * up) @ w[prefix + "feed_forward.w2.weight"].double().T

    for i in range(emb_cfg["num_hidden_layers"]):
        x = layer(x, f"embedding_model.encoder.{i}.", emb_cfg)
    for i in range(llm_cfg["num_hidden_layers"]):
        x = layer(x, f"language_model.model.layers.{i}.", llm_cfg)
    x = rms(x, w["language_model.model.norm.weight"], llm_cfg["rms_norm_eps"])
    return x @ w["language_model.output.weight"].double().T


def image_inputs(directory, teacher, question="What colour is the square?", n_images=1):
    from PIL import Image

    tokenizer = load_tokenizer(directory)
    images = [Image.new("RGB", (90 + 40 * i, 60), (200, 30 * i, 40)) for i in range(n_images)]
    pixel_values, tiles = prepare_images(teacher.config, images)
    text = chat_prompt(teacher.config, "<image>\n" * n_images + question, tiles)
    ids = torch.tensor([tokenizer.encode(text)])
    return ids, pixel_values, tiles


def test_hovle_teacher_matches_reference(hovle_dir):
    teacher = mmdistill.load_teacher(str(hovle_dir), dtype="float64")
    assert teacher.config.num_layers == 4 and teacher.config.teacher["adapter"] == "hovle"
    ids, pixel_values, tiles = image_inputs(hovle_dir, teacher, n_images=2)
    ctx = teacher.config.front_end["vision"]["img_context_token_id"]
    assert int((ids == ctx).sum()) == sum(tiles) * teacher.config.front_end["num_image_token"]
    with torch.no_grad():
        ours = teacher(ids, pixel_values=pixel_values).logits
    ref = reference_forward(hovle_dir, ids, pixel_values)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_hovle_all_layout_and_generation(hovle_dir, tmp_path):
    teacher = mmdistill.load_teacher(str(hovle_dir))
    ids, pixel_values, _ = image_inputs(hovle_dir, teacher)
    same = mmdistill.seed(teacher, attention_layers="all")
    with torch.no_grad():
        torch.testing.assert_close(
            same(ids, pixel_values=pixel_values).logits,
            teacher(ids, pixel_values=pixel_values).logits,
            rtol=0,
            atol=1e-5,
        )
    # the image tokens lie in the prefilled prefix; the question's last tokens are steps
    ctx = teacher.config.front_end["vision"]["img_context_token_id"]
    prefix = int((ids[0] == ctx).nonzero().max()) + 2
    assert prefix < ids.shape[1] - 3
    student = mmdistill.seed(teacher, attention_layers="every:2")
    for model in (teacher, mmdistill.seed(teacher, attention_layers="none"), student):
        check_cached_generation(model, ids, prefix, pixel_values=pixel_values, chunk_size=8)
    student.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "tokenizer.model").exists()
    loaded = mmdistill.load_student(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(
            loaded(ids, pixel_values=pixel_values).logits,
            student(ids, pixel_values=pixel_values).logits,
        )


def test_hovle_layer_indices_span_both_stacks(hovle_dir):
    teacher = mmdistill.load_teacher(str(hovle_dir))
    student = mmdistill.seed(teacher, attention_layers="1,2")
    assert student.config.layer_types == ["mamba", "attention", "attention", "mamba"]
    # Layer 3 is LLM layer 1: its mixer is seeded from language_model.model.layers.1.
    w = load_file(str(hovle_dir / "model.safetensors"))
    wqkv = w["language_model.model.layers.1.attention.wqkv.weight"].view(2, 4, 16, 64)
    assert torch.equal(student.layers[3].mixer.b_proj.weight, wqkv[:, 2].reshape(32, 64))
    assert torch.equal(student.layers[3].mixer.c_proj.weight, wqkv[:, :2].reshape(64, 64))


def test_missing_image_is_a_clear_error(hovle_dir, tmp_path):
    from mmdistill.errors import DataError

    teacher = mmdistill.load_teacher(str(hovle_dir))
    with pytest.raises(DataError, match="nope.png"):
        prepare_images(teacher.config, [tmp_path / "nope.png"])
