"""``mmdistill.metrics`` against torch's own ``kl_div`` and ``cross_entropy`` on random logits
(masks, temperatures, bfloat16, several chunks), its gradients against autograd through those
references, and the chunking's promise: no float32 tensor larger than one chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmdistill.metrics import score_tokens, token_kl, token_nll
from mmdistill.objective import kl_per_token, next_token_ce

B, L, V = 3, 7, 50


def logits(seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, V, generator=g) * 3).to(dtype)


def reference_kl(student, teacher, mask, temperature):
    """Masked mean of KL(teacher ‖ student) per token at temperature T, scaled by T²."""
    s = F.log_softmax(student.float() / temperature, -1)
    t = F.log_softmax(teacher.float() / temperature, -1)
    per_token = F.kl_div(s, t, log_target=True, reduction="none").sum(-1) * temperature**2
    if mask is None:
        return per_token.mean()
    return per_token[mask.bool()].mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_training_kl_value_and_gradient_match_kl_div(temperature, masked):
    mask = (torch.rand(B, L, generator=torch.Generator().manual_seed(5)) > 0.3).long()
    mask = mask if masked else None
    teacher = logits(1)
    student = logits(2).requires_grad_()
    ours = kl_per_token(student, teacher, mask, temperature)
    (grad,) = torch.autograd.grad(ours, student)
    expected_student = student.detach().clone().requires_grad_()
    expected = reference_kl(expected_student, teacher, mask, temperature)
    (expected_grad,) = torch.autograd.grad(expected, expected_student)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-7, rtol=1e-5)


def test_chunks_give_the_same_values_and_gradients():
    """Chunked (recomputed in the backward pass) and whole give the same numbers, in bfloat16
    too; gradients reach the student's logits only."""
    teacher = logits(3, torch.bfloat16)
    results = []
    for chunk in (V * 2, V * B * L):  # 2 positions per chunk, then all at once
        student = logits(4, torch.bfloat16).requires_grad_()
        kl = token_kl(student, teacher, temperature=1.5, chunk_elements=chunk)
        assert kl.shape == (B, L) and kl.dtype == torch.float32
        (kl * torch.arange(B * L).view(B, L)).sum().backward()
        results.append((kl.detach(), student.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][1].dtype == torch.bfloat16 and not teacher.requires_grad


def test_nll_matches_cross_entropy_with_a_mask():
    x = logits(6, torch.bfloat16).requires_grad_()
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 4:] = 0
    ours = next_token_ce(x, ids, mask, ignore_id=3)
    keep = mask[:, 1:].bool() & mask[:, :-1].bool() & (ids[:, 1:] != 3)
    ce = F.cross_entropy(x[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    expected = ce[keep.reshape(-1)].mean()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(ours, x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert torch.allclose(grad.float(), expected_grad.float(), atol=1e-3)
    chunked = token_nll(x[:, :-1], ids[:, 1:], chunk_elements=V)
    assert torch.equal(chunked, token_nll(x[:, :-1], ids[:, 1:]))


def test_score_tokens_sums():
    student, teacher = logits(8).view(-1, V), logits(9, torch.bfloat16).view(-1, V)
    labels = torch.randint(0, V, (B * L,), generator=torch.Generator().manual_seed(10))
    sums = score_tokens(student, labels, teacher, chunk_elements=V * 4)
    s, t = F.log_softmax(student.double(), -1), F.log_softmax(teacher.double(), -1)
    assert sums.tokens == B * L
    assert sums.nll == pytest.approx(float(F.nll_loss(s, labels, reduction="sum")), rel=1e-6)
    kl = F.kl_div(s, t, log_target=True, reduction="sum")
    assert sums.kl == pytest.approx(float(kl), rel=1e-5)
    assert sums.agree == int((student.argmax(-1) == teacher.argmax(-1)).sum())
    alone = score_tokens(teacher, labels)
    assert alone.kl == 0 and alone.agree == 0
    assert alone.nll == pytest.approx(float(F.nll_loss(t, labels, reduction="sum")), rel=1e-5)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_float32_copy_larger_than_a_chunk():
    """bfloat16 logits of both models: forward and backward of the training KL and CE, and the
    eval sums, never make a float32 tensor of more than one chunk's logits, and the backward pass
    keeps none (each chunk is recomputed from the bfloat16 logits)."""
    chunk = V * 3
    teacher = logits(11, torch.bfloat16)
    student = logits(12, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(13))
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with _LargestFloat32() as seen:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = token_kl(student, teacher, 2.0, chunk).mean()
            loss = loss + token_nll(student, labels, chunk).mean()
        loss.backward()
        score_tokens(student.detach().view(-1, V), labels.view(-1), teacher.view(-1, V), chunk)
    assert 0 < seen.largest <= chunk
    assert kept and all(t.dtype != torch.float32 or t.numel() <= B * L for t in kept)
