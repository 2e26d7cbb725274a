"""A Triton matrix-vector product for one-token decode steps (imported only where Triton is).

At batch 1 a decode step is a chain of ``y = W x`` products bound by reading ``W``. On an H200
cuBLAS reads the linear student's packed in-projection (6160 x 2048) at 2.59 TB/s, its
out-projection (2048 x 2048) at 1.40 TB/s and the 92,553 x 2048 LM head at 2.80 TB/s; this
kernel, with the block shapes below, at 3.10, 1.78 and 4.29 TB/s (``benchmarks/gemv.py``,
docs/benchmarks.md). Each program reduces ``BLOCK_N`` rows of ``W`` over the input dimension
in float32, then adds the bias and rounds once, as ``F.linear`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gemv_kernel(
    W, X, BIAS, Y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        inside = cols < K
        w = tl.load(
            W + rows[:, None].to(tl.int64) * stride_wn + cols[None, :],
            mask=live[:, None] & inside[None, :],
            other=0.0,
        )
        x = tl.load(X + cols, mask=inside, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + rows, mask=live, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=live)


def block_config(n: int) -> dict:
    """Launch parameters by output width: the autotuner's picks on the H200 for the
    out-projection (narrow), the LM head (wide) and the packed in-projection (between)."""
    if n <= 4096:
        return {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2}
    if n >= 32768:
        return {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8, "num_stages": 4}


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for an ``x`` of one row (``[..., K]`` with one ``K``-row)
    and a ``weight`` ``[N, K]`` whose rows are contiguous."""
    n, k = weight.shape
    x1 = x.reshape(k)
    if x1.stride(0) != 1:
        x1 = x1.contiguous()
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    config = block_config(n)
    gemv_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        weight, x1, bias if bias is not None else y, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, **config,
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)
