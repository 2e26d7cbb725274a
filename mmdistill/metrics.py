"""Token metrics over the vocabulary: NLL, KL(teacher ‖ student) and top-1 agreement.

One definition serves the training losses (:mod:`mmdistill.objective`), ``mmdistill eval`` and
the demo. Natural log throughout; for teacher logits ``t``, student logits ``s`` and temperature
``T``:

* ``nll = −log softmax(s)[label]``;
* ``kl = Σ_v p_T(v) (log p_T(v) − log p_S(v))`` with ``p_T = softmax(t / T)``,
  ``p_S = softmax(s / T)`` (the teacher's side is computed outside the autograd graph, so only
  the student's log-softmax is kept for the backward pass);
* ``agree = argmax s == argmax t``.

Logits arrive as ``[..., V]`` in any dtype (bfloat16 included). Positions are processed in chunks
of about :data:`CHUNK_ELEMENTS` logits: each chunk is upcast to float32 on its own, so float32
copies of the full ``[b, l, V]`` logits of either model never exist. When gradients are needed
and there is more than one chunk, each chunk is recomputed in the backward pass (activation
checkpointing), so its float32 intermediates are not kept either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["CHUNK_ELEMENTS", "TokenSums", "score_tokens", "token_kl", "token_nll"]

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB of float32


def _chunk_rows(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, vocab))


def _map_rows(
    fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], rows: int
) -> torch.Tensor:
    """``fn`` over row chunks of ``[n, ...]`` tensors; per-row results ``[n]`` concatenated."""
    if tensors[0].shape[0] <= rows:
        return fn(*tensors)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    for parts in zip(*(t.split(rows) for t in tensors), strict=True):
        outs.append(checkpoint(fn, *parts, use_reentrant=False) if grad else fn(*parts))
    return torch.cat(outs)


def _kl_terms(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """``p_t (log p_t − log p_s)`` elementwise, ``[n, V]``; summed over the vocabulary it is the
    KL of each row (``log_t`` carries no gradient)."""
    return log_t.exp() * (log_t - log_s)


def _log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    scaled = logits.float()
    return F.log_softmax(scaled if temperature == 1.0 else scaled / temperature, dim=-1)


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) ``[n]`` of ``[n, V]`` logits; gradients reach the student only."""
    with torch.no_grad():
        log_t = _log_probs(teacher, temperature)
    return _kl_terms(_log_probs(student, temperature), log_t).sum(-1)


def _nll(log_p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``−log p[label]`` per row of ``[n, V]`` log-probabilities."""
    return -log_p.gather(-1, labels[:, None]).squeeze(-1)


def _nll_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _nll(_log_probs(logits), labels)


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """KL(teacher ‖ student) at every position (not scaled by T²).

    Args:
        student_logits, teacher_logits: ``[..., V]``, any float dtype.
        temperature: both distributions are ``softmax(logits / T)``.
        chunk_elements: logits per chunk.

    Returns:
        ``[...]`` float32, differentiable with respect to ``student_logits``.
    """
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    rows = _chunk_rows(vocab, chunk_elements)
    kl = _map_rows(lambda a, b: _kl_rows(a, b, temperature), (s, t), rows)
    return kl.view(student_logits.shape[:-1])


def token_nll(
    logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """Negative log-likelihood of ``labels`` at every position.

    Args:
        logits: ``[..., V]``, any float dtype.
        labels: ``[...]`` token ids.
        chunk_elements: logits per chunk.

    Returns:
        ``[...]`` float32, differentiable with respect to ``logits``.
    """
    vocab = logits.shape[-1]
    flat = (logits.reshape(-1, vocab), labels.reshape(-1))
    return _map_rows(_nll_rows, flat, _chunk_rows(vocab, chunk_elements)).view(labels.shape)


@dataclass
class TokenSums:
    """Sums over scored tokens (float64 on the host).

    Attributes:
        tokens: tokens scored.
        nll: summed NLL of the labels.
        kl: summed KL(reference ‖ model) (0 without a reference).
        agree: tokens whose argmax equals the reference's.
    """

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def add(self, other: TokenSums) -> None:
        self.tokens += other.tokens
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree


@torch.no_grad()
def score_tokens(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> TokenSums:
    """NLL of ``labels``, and KL and top-1 agreement against ``reference``, summed over tokens.

    Args:
        logits: ``[n, V]`` the model's logits at the positions predicting ``labels``.
        labels: ``[n]`` token ids.
        reference: ``[n, V]`` the teacher's logits at the same positions, or ``None``.
        chunk_elements: logits per chunk.

    Returns:
        :class:`TokenSums` over the ``n`` tokens.
    """
    sums = TokenSums(tokens=labels.numel())
    rows = _chunk_rows(logits.shape[-1], chunk_elements)
    for start in range(0, labels.numel(), rows):
        part = slice(start, start + rows)
        logp = _log_probs(logits[part])
        label = labels[part].to(logp.device)
        sums.nll += _nll(logp, label).sum().double().item()
        if reference is not None:
            ref = _log_probs(reference[part].to(logp.device))
            sums.kl += _kl_terms(logp, ref).sum().double().item()
            sums.agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())
    return sums
