"""A student with an image vocabulary and task LoRA adapters: the same function on text when
added, decoupled heads, per-task adapters that leave the other task's weights untouched, save and
load, and merged per-task models equal to the adapter model."""

from __future__ import annotations

import pytest
import torch

from mmdistill import load_student, seed
from mmdistill.image_vocab import ImageVocabSpec
from mmdistill.omni_student import add_image_vocabulary, merge_task
from mmdistill.roles import parameter_role, set_trainable
from mmdistill.task_lora import LoraSpec
from mmdistill.tokenizer import load_tokenizer

CODEBOOK, GRID = 32, 2


def _spec(student, mode="decoupled") -> ImageVocabSpec:
    return ImageVocabSpec(
        text_vocab_size=student.config.vocab_size,
        codebook_size=CODEBOOK,
        grid=GRID,
        embed_dim=16,
        mode=mode,
    )


@pytest.fixture(scope="module")
def base(hovle):
    return seed(hovle, attention_layers="0", seed=0).float()


@pytest.fixture(scope="module")
def omni(base):
    return add_image_vocabulary(base, _spec(base), LoraSpec(dropout=0.0), seed=1)


def _t2i_ids(student, batch=2) -> torch.Tensor:
    spec = student.image_vocab.spec
    g = torch.Generator().manual_seed(0)
    caption = torch.randint(10, 100, (batch, 5), generator=g)
    codes = torch.randint(0, CODEBOOK, (batch, GRID * GRID), generator=g) + spec.code_offset
    first = torch.tensor([spec.layout_id("<|t2i|>"), spec.layout_id("<|sot|>")]).expand(batch, 2)
    mid = torch.tensor([spec.layout_id("<|eot|>"), spec.layout_id("<|soi|>")]).expand(batch, 2)
    return torch.cat([first, caption, mid, codes], dim=1)


def _randomise_adapters(model, scale=0.05) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if parameter_role(name) == "lora":
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_adding_the_vocabulary_keeps_the_text_function(base, omni):
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for task in ("mmu", "t2i"):
        omni.use_task(task)
        torch.testing.assert_close(omni(ids).logits, base(ids).logits, rtol=0, atol=1e-6)


def test_heads_span_their_own_vocabularies(omni):
    ids = _t2i_ids(omni)
    omni.use_task("t2i")
    image = omni(ids, head="image").logits
    text = omni(ids, head="text").logits
    assert image.shape[-1] == CODEBOOK
    assert text.shape[-1] == omni.config.vocab_size


def test_shared_vocabulary_has_one_joint_head(base):
    shared = add_image_vocabulary(base, _spec(base, "shared"), LoraSpec(shared=True))
    ids = _t2i_ids(shared)
    logits = shared(ids, head="image").logits
    assert logits.shape[-1] == shared.config.vocab_size + CODEBOOK
    torch.testing.assert_close(logits, shared(ids, head="text").logits)
    assert {n.split(".")[-2] for n, _ in shared.named_parameters() if ".lora_A." in n} == {"shared"}


def test_training_one_task_leaves_the_other_tasks_weights_identical(base):
    model = add_image_vocabulary(base, _spec(base), LoraSpec(dropout=0.0), seed=1)
    _randomise_adapters(model)
    set_trainable(model, ["lora", "image_embeddings", "image_head"])
    for name, p in model.named_parameters():  # the mmu stage trains only the mmu adapter
        if ".lora_" in name and ".t2i." in name:
            p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.use_task("mmu")
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = model(ids).logits.logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".mmu." in k for k in changed)
    assert not any(".t2i." in k for k in changed)


def test_adapters_change_only_their_task(omni):
    model = omni
    _randomise_adapters(model)
    ids = torch.randint(10, 200, (1, 8), generator=torch.Generator().manual_seed(1))
    model.use_task("mmu")
    mmu = model(ids).logits
    model.use_task("t2i")
    t2i = model(ids).logits
    assert not torch.allclose(mmu, t2i)


def test_merged_task_models_equal_the_adapter_model(omni):
    _randomise_adapters(omni)
    ids = _t2i_ids(omni)
    for task, head in (("mmu", "text"), ("t2i", "image")):
        omni.use_task(task)
        expected = omni(ids, head=head).logits
        merged = merge_task(omni, task)
        assert merged.config.lora is None
        assert not any(".lora_" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(ids, head=head).logits, expected, rtol=0, atol=1e-5)


def test_saved_student_loads_with_its_vocabulary_adapters_and_tokens(omni, tmp_path):
    _randomise_adapters(omni)
    omni.save_pretrained(tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    ids = _t2i_ids(omni)
    for task, head in (("mmu", "text"), ("t2i", "image")):
        omni.use_task(task)
        loaded.use_task(task)
        torch.testing.assert_close(loaded(ids, head=head).logits, omni(ids, head=head).logits)
    for name in ("mmu", "t2i"):
        assert (tmp_path / "s" / "adapters" / name / "adapter_model.safetensors").is_file()
    tok = load_tokenizer(tmp_path / "s")
    spec = omni.image_vocab.spec
    assert tok.token_to_id("<|soi|>") == spec.layout_id("<|soi|>")
    assert tok.encode("<|t2i|>", add_special_tokens=False) == [spec.layout_id("<|t2i|>")]


def test_an_image_code_ends_a_text_answer():
    """A shared vocabulary lets answer generation emit image codes; they end the answer."""
    from mmdistill.answers import _decode
    from mmdistill.tokenizer import Tokenizer

    class Letters(Tokenizer):
        vocab_size = 10

        def decode(self, ids, skip_special_tokens=True):
            return "".join("abcdefghij"[i] for i in ids)

    assert _decode([1, 2, 12, 3], Letters(), [], None) == "bc"
    assert _decode([1, 2, 3], Letters(), [3], None) == "bc"
