"""Split-KV Triton kernel for one decode token over a static KV cache (imported on CUDA only).

The cache ``[b, kv_heads, capacity, d]`` is cut into fixed splits of ``split`` positions; one
program per (split, KV head, row) streams its keys and values once, for all the query heads
that share that KV head, and keeps an online softmax (running max ``m``, sum ``l``, weighted
values) in float32. Positions at or beyond ``length`` (read from the device) are masked; a split
that starts past it does no work. The grid depends only on the shapes, so the launch can be
captured in a CUDA graph and replayed while ``length`` grows. A few PyTorch ops combine the
splits' partial results. The query heads of one KV head form the rows of a tensor-core tile
(padded to 16), so the scores and the weighted values are ``tl.dot`` products, which Triton
software-pipelines over the cache; float32 inputs use exact (IEEE) products, half-precision ones
round the softmax weights to their dtype before the value product, as flash decoding does.

Reference: :func:`mmdistill.kernels.attention.decode_attention_ref`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(
    Q,
    K,
    V,
    LENGTH,
    ACC,
    M,
    L,
    split,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    HEAD_DIM,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    splits = tl.num_programs(0)
    length = tl.load(LENGTH)
    start = pid_s * split
    end = tl.minimum(start + split, length)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = pid_h * GROUP + g
    live = g < GROUP
    in_dim = d < HEAD_DIM  # D is the head dimension rounded up to a power of two
    q_ptrs = Q + pid_b * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=live[:, None] & in_dim[None, :], other=0.0)
    k_base = K + pid_b * stride_kb + pid_h * stride_kh
    v_base = V + pid_b * stride_vb + pid_h * stride_vh
    # A finite floor instead of -inf: an empty split then yields m = floor, l = 0, acc = 0, and
    # exp(floor - floor) stays 1 rather than NaN.
    m = tl.full([GROUP_PAD], -1e30, tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        inside = t < end
        tile = inside[:, None] & in_dim[None, :]
        k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=tile, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + t[:, None] * stride_vt + d[None, :], mask=tile, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    row = (pid_b * tl.num_programs(1) * GROUP + heads) * splits + pid_s
    tl.store(ACC + row[:, None] * HEAD_DIM + d[None, :], acc, mask=live[:, None] & in_dim[None, :])
    tl.store(M + row, m, mask=live)
    tl.store(L + row, l_sum, mask=live)


def split_length(capacity: int, rows: int, block: int, device: torch.device) -> int:
    """Positions per split: enough (split, KV head, row) programs to fill the GPU about four
    times over, each a whole number of ``block``-position tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, -(-4 * sms // rows))
    per_split = -(-capacity // splits)
    return max(block, -(-per_split // block) * block)


def decode_attention(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """Arguments and result as :func:`mmdistill.kernels.attention.decode_attention_ref`."""
    b, heads, d = q.shape
    kv_heads, capacity = k_buffer.shape[1], k_buffer.shape[2]
    if heads % kv_heads or k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1:
        raise ValueError(
            "decode_attention needs heads divisible by kv_heads and a contiguous head_dim; got "
            f"q {tuple(q.shape)}, k {tuple(k_buffer.shape)}"
        )
    q = q.contiguous()
    group = heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))  # tensor-core tiles have 16+ rows
    block = 64
    split = split_length(capacity, b * kv_heads, block, q.device)
    splits = -(-capacity // split)
    acc = torch.empty(b, heads, splits, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, heads, splits, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    _split_kernel[(splits, kv_heads, b)](
        q,
        k_buffer,
        v_buffer,
        length,
        acc,
        m,
        l_sum,
        split,
        1.0 / math.sqrt(d),
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        k_buffer.stride(2),
        v_buffer.stride(0),
        v_buffer.stride(1),
        v_buffer.stride(2),
        d,
        GROUP=group,
        GROUP_PAD=group_pad,
        D=max(16, triton.next_power_of_2(d)),
        BLOCK_T=block,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=3,
    )
    weight = torch.exp(m - m.amax(-1, keepdim=True))
    out = (acc * weight[..., None]).sum(2) / (l_sum * weight).sum(-1, keepdim=True)
    return out.to(q.dtype)
