"""Writing HoVLE-format directories (mmdistill.teachers.hovle_export): the exporter inverts the
HoVLE adapter, so export -> load_teacher rebuilds the same model and the same logits."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

import mmdistill
from mmdistill.seeding import seed
from mmdistill.teachers.hovle_export import (
    to_hovle_state_dict,
    train_sentencepiece,
    write_hovle_directory,
)
from mmdistill.teachers.tiny_hovle import write_tiny_hovle


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    write_tiny_hovle(out, seed=3, num_embedding_layers=2, num_llm_layers=2)
    return out


def test_export_inverts_the_adapter_exactly(fixture_dir):
    """Exporting the loaded fixture gives back every tensor the fixture wrote, bit for bit."""
    written = load_file(str(fixture_dir / "model.safetensors"))
    exported = to_hovle_state_dict(mmdistill.load_teacher(str(fixture_dir)))
    unused = "language_model.model.tok_embeddings.weight"  # dropped by the adapter
    assert exported.keys() == written.keys()
    assert exported[unused].shape == written[unused].shape
    for key, value in written.items():
        if key != unused:
            assert torch.equal(exported[key], value), key


def test_export_load_teacher_round_trip_gives_the_same_logits(fixture_dir, tmp_path):
    teacher = mmdistill.load_teacher(str(fixture_dir))
    hf_config = json.loads((fixture_dir / "config.json").read_text())
    tokenizer_model = (fixture_dir / "tokenizer.model").read_bytes()
    write_hovle_directory(tmp_path, hf_config, to_hovle_state_dict(teacher), tokenizer_model)
    again = mmdistill.load_teacher(str(tmp_path))
    assert again.config.layer_types == teacher.config.layer_types
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    tokens = teacher.config.front_end["num_image_token"]
    img_ctx = hf_config["embedding_config"]["img_context_token_id"]
    ids = torch.tensor([[1, 20, 21, *[img_ctx] * tokens, 22, 23, 24]])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = teacher(ids, pixel_values=pixels).logits
        theirs = again(ids, pixel_values=pixels).logits
    assert torch.equal(ours, theirs)


def test_students_have_no_hovle_layout(fixture_dir):
    student = seed(mmdistill.load_teacher(str(fixture_dir)), attention_layers="every:2")
    with pytest.raises(ValueError, match="all-attention"):
        to_hovle_state_dict(student)


def test_space_after_newline_tokenizer_makes_answers_prefix_stable_words():
    """A word after a newline is the same token as inside a sentence, a text ending in a newline
    tokenises as a prefix of the text plus its continuation, and the model bytes are a function
    of the training text alone."""
    lines = ["<|im_start|>assistant\nred<|im_end|>", "a large red circle.", "2 red, 3 blue"] * 40
    model = train_sentencepiece(lines, 300, space_after_newline=True)
    assert train_sentencepiece(lines, 300, space_after_newline=True) == model
    sp = spm.SentencePieceProcessor(model_proto=model)
    prompt = "<|im_start|>assistant\n"
    for answer in ("red", "2"):
        full = sp.encode(prompt + answer + "<|im_end|>")
        head = sp.encode(prompt)
        assert full[: len(head)] == head
        assert full[len(head) : -1] == sp.encode(" " + answer)
