"""Attention of one new token over a preallocated KV cache whose fill level lives on the device.

A decode step replayed from a CUDA graph cannot slice the cache to its current length (the
length would be frozen at capture time), so it attends over the whole static buffer and masks
the positions at or beyond ``length``, a ``[1]`` long tensor the step itself advances.

:func:`decode_attention_ref` is the PyTorch computation (float32 softmax, the CPU path);
:func:`decode_attention` is a custom op that runs the split-KV Triton kernel of
:mod:`mmdistill.kernels.triton_attention` on CUDA and the reference elsewhere, opaque to
``torch.compile``. The GPU tests compare the two.
"""

from __future__ import annotations

import math

import torch


def decode_attention_ref(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """Softmax attention of one query per head over the first ``length`` cached positions.

    Args:
        q: ``[b, heads, d]`` queries of the new token (RoPE applied).
        k_buffer, v_buffer: ``[b, kv_heads, capacity, d]`` caches; query head ``i`` reads KV head
            ``i // (heads // kv_heads)``.
        length: ``[1]`` long, the number of filled positions (the new token's included), the
            same for every row.

    Returns:
        ``[b, heads, d]`` in ``q``'s dtype, scaled by ``1 / sqrt(d)`` as SDPA does.
    """
    b, heads, d = q.shape
    kv_heads, capacity = k_buffer.shape[1], k_buffer.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    qg = q.view(b, kv_heads, heads // kv_heads, d).to(compute)
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, k_buffer.to(compute)) / math.sqrt(d)
    filled = torch.arange(capacity, device=q.device) < length
    scores = scores.masked_fill(~filled, float("-inf"))
    out = torch.einsum("bhgt,bhtd->bhgd", scores.softmax(-1), v_buffer.to(compute))
    return out.reshape(b, heads, d).to(q.dtype)


@torch.library.custom_op("mmdistill::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """:func:`decode_attention_ref`'s result: the Triton kernel on CUDA, the reference elsewhere."""
    if q.is_cuda:
        from .triton_attention import decode_attention as triton_decode

        return triton_decode(q, k_buffer, v_buffer, length)
    return decode_attention_ref(q, k_buffer, v_buffer, length)


@decode_attention.register_fake
def _decode_attention_fake(q, k_buffer, v_buffer, length):
    return torch.empty_like(q)


__all__ = ["decode_attention", "decode_attention_ref"]
