"""Triton kernels of the decoder block's inference path (imported only where Triton is installed).

Eagerly, each RMSNorm of :class:`~mmdistill.decoder.RMSNorm` is about eight PyTorch kernels
(cast, square, mean, add, rsqrt, multiply, cast, weight), and a batch-1 decode step of a
32-layer model runs 65 of them beside 64 residual adds and 32 SiLU·mul pairs: most of the
step's roughly 900 launches, each a few microseconds even when replayed from a CUDA graph.
These kernels do that work in one launch each, with the rounding of the PyTorch path:

* :func:`add_rms_norm` -- ``s = x + residual`` (rounded to ``x``'s dtype), then
  ``weight * (s * rsqrt(mean(s²) + eps)).to(x.dtype)`` computed in float32: the residual add
  and the next norm of a pre-norm block (or a norm alone);
* :func:`silu_mul` -- ``silu(gate).to(gate.dtype) * up``: the gated MLP's activation.

One program handles one row (``add_rms_norm``) or one block of a row (``silu_mul``). The
PyTorch functions they replace are :func:`mmdistill.decoder.rms_norm` and the MLP's own
``act(gate) * up``; the GPU tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WIDTH = 65536
"""Widest row :func:`add_rms_norm` takes in one program (callers fall back past it)."""


@triton.jit
def _add_rms_norm_kernel(
    X,
    R,
    W,
    S,
    Y,
    N,
    stride_x,
    stride_r,
    stride_s,
    stride_y,
    eps,
    HAS_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_R:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=ok)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, norm(s))`` with ``s = x + residual`` (``residual=None``: ``s = x``, not copied).

    Args:
        x, residual: ``[..., width]`` of one dtype (bf16, fp16 or fp32), ``width`` at most
            :data:`MAX_WIDTH`.
        weight: ``[width]``; the norm's output has the dtype ``weight * x`` would have.
    """
    width = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(rows, width, device=x.device, dtype=out_dtype)
    if residual is None:
        s, r2 = x2, x2
    else:
        r2 = _rows(residual)
        s = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    if rows:
        block = triton.next_power_of_2(width)
        _add_rms_norm_kernel[(rows,)](
            x2, r2, weight, s, y, width,
            x2.stride(0), r2.stride(0), s.stride(0), y.stride(0), eps,
            HAS_R=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return (x if residual is None else s.view(x.shape)), y.view(x.shape)


@triton.jit
def _silu_mul_kernel(G, U, Y, N, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(G + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for two ``[..., width]`` tensors of one dtype."""
    width = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    y = torch.empty(g2.shape, device=gate.device, dtype=gate.dtype)
    block = 1024
    if g2.shape[0]:
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(width, block))](
            g2, u2, y, width, g2.stride(0), u2.stride(0), y.stride(0), BLOCK=block, num_warps=4
        )
    return y.view(gate.shape)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, width]`` with contiguous rows (a view where the layout allows: the
    halves of a packed projection's output are)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
