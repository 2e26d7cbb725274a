"""Text-to-image generation: cached decoding equals recomputing the whole sequence, guidance
mixes conditional and unconditional rows, and sampling stays inside the image codebook."""

from __future__ import annotations

import pytest
import torch
from conftest import make_omni_student

from mmdistill.data.t2i import t2i_prompt
from mmdistill.errors import CheckpointError
from mmdistill.t2i_generation import Sampling, generate_codes

CAPTIONS = [[20, 31, 42], [50, 61]]


@pytest.fixture(scope="module")
def student(hovle):
    return make_omni_student(hovle)


def _recomputed(model, captions, cfg_scale=0.0) -> torch.Tensor:
    """Greedy codes by a full forward over prompt + codes so far at every step (no cache)."""
    spec = model.image_vocab.spec
    model.use_task("t2i")
    rows = [t2i_prompt(spec, c) for c in captions]
    if cfg_scale:
        rows += [t2i_prompt(spec, [])] * len(captions)
    out = []
    for _ in range(spec.codes_per_image):
        length = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (length - len(r)) + r for r in rows], device=model.device)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
        mask = mask.to(model.device)
        logits = model(ids, attention_mask=mask, head="image").logits[:, -1].float()
        if cfg_scale:
            n = len(captions)
            logits = logits[n:] + cfg_scale * (logits[:n] - logits[n:])
        code = logits.argmax(-1)
        out.append(code)
        token = (code + spec.code_offset).tolist()
        rows = [r + [token[i % len(captions)]] for i, r in enumerate(rows)]
    return torch.stack(out, 1).view(len(captions), spec.grid, spec.grid)


@pytest.mark.parametrize("cfg_scale", [0.0, 3.0])
def test_cached_generation_equals_recomputation(student, cfg_scale):
    got = generate_codes(student, CAPTIONS, Sampling(cfg_scale=cfg_scale)).codes
    assert torch.equal(got, _recomputed(student, CAPTIONS, cfg_scale))


def test_guidance_changes_the_codes(student):
    plain = generate_codes(student, CAPTIONS * 4).codes
    guided = generate_codes(student, CAPTIONS * 4, Sampling(cfg_scale=20.0)).codes
    assert not torch.equal(plain, guided)


def test_sampling_never_leaves_the_codebook(student):
    sampling = Sampling(temperature=5.0, generator=torch.Generator().manual_seed(0))
    out = generate_codes(student, CAPTIONS * 8, sampling)
    assert out.crossed == 0
    assert out.codes.min() >= 0 and out.codes.max() < student.image_vocab.spec.codebook_size


def test_a_shared_vocabulary_can_cross_and_is_counted(hovle):
    model = make_omni_student(hovle, mode="shared", shared_lora=True)
    with torch.no_grad():
        model.image_vocab.head.weight.mul_(0.0)  # text tokens now win every step
    out = generate_codes(model, CAPTIONS)
    assert out.crossed == len(CAPTIONS) * model.image_vocab.spec.codes_per_image


def test_a_student_without_an_image_vocabulary_is_refused(hovle):
    from mmdistill import seed

    with pytest.raises(CheckpointError, match="no image vocabulary"):
        generate_codes(seed(hovle, attention_layers="none"), CAPTIONS)
