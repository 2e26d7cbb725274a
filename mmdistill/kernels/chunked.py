"""Chunked SSD in pure PyTorch: the CPU path (and the GPU fallback without mamba-ssm).

The sequence is cut into chunks of ``chunk_size``. Inside a chunk the output is the quadratic
"attention-like" form ``(C Bᵀ ∘ decay) (dt x)``; across chunks a short sequential scan carries the
``[h, p, n]`` state. Cost is O(l · chunk · h · (p + n)) with a Python loop over ``l / chunk``
chunks, so memory stays linear in length (no chunk-by-chunk matrix as in the paper's minimal
listing, which is quadratic in the number of chunks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .naive import expand_groups, prepare_dt


def segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(x[..., j+1 : i+1])`` for ``i >= j``, ``-inf`` above the diagonal.

    Built from a masked cumulative sum rather than a difference of cumsums, which keeps the
    exponent exact for long chunks.
    """
    t = x.shape[-1]
    x = x[..., None].expand(*x.shape, t)  # x[..., k, j] = x[..., k]
    strict = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~strict, 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(
        ~strict.logical_or(torch.eye(t, dtype=torch.bool, device=x.device)), -torch.inf
    )


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Whole-sequence SSD; shapes as :func:`mmdistill.kernels.ssd`. Computes in float32 (float64
    inputs stay float64) and returns ``y`` in ``x.dtype``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    b, l, h, p = x.shape
    n = B.shape[-1]
    cdt = torch.promote_types(x.dtype, torch.float32)
    dt = prepare_dt(dt, dt_bias, dt_softplus).to(cdt)
    Bh = expand_groups(B, h, 2).to(cdt)
    Ch = expand_groups(C, h, 2).to(cdt)
    xf = x.to(cdt)
    state = x.new_zeros(b, h, p, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    if l == 0:
        y = x.new_zeros(b, 0, h, p)
        return (y, state) if return_final_state else y

    # Padding with dt = 0 adds nothing to the state and does not decay it.
    pad = (-l) % chunk_size
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    xs = rearrange(xf * dt[..., None], "b (c k) h p -> b c k h p", k=chunk_size)
    Bc = rearrange(Bh, "b (c k) h n -> b c k h n", k=chunk_size)
    Cc = rearrange(Ch, "b (c k) h n -> b c k h n", k=chunk_size)
    dA = rearrange(dt * A.to(cdt), "b (c k) h -> b h c k", k=chunk_size)
    dA_cum = torch.cumsum(dA, dim=-1)  # [b, h, c, k]

    # Within each chunk: y_i = sum_{j<=i} C_i·B_j exp(sum_{j<m<=i} dA_m) dt_j x_j.
    decay_in = torch.exp(segsum(dA))  # [b, h, c, k, k]
    scores = torch.einsum("bcihn,bcjhn->bhcij", Cc, Bc) * decay_in
    y_diag = torch.einsum("bhcij,bcjhp->bcihp", scores, xs)

    # Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(dA_cum[..., -1:] - dA_cum)  # [b, h, c, k]
    chunk_states = torch.einsum("bcjhn,bhcj,bcjhp->bchpn", Bc, decay_to_end, xs)
    chunk_decay = torch.exp(dA_cum[..., -1])  # [b, h, c]

    # Sequential scan over chunks: states entering each chunk.
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # [b, c, h, p, n]

    # Contribution of the entering state to every position of the chunk.
    y_off = torch.einsum("bcihn,bchpn,bhci->bcihp", Cc, entering, torch.exp(dA_cum))
    y = rearrange(y_diag + y_off, "b c k h p -> b (c k) h p")[:, :l]
    if D is not None:
        y = y + xf[:, :l] * D.to(cdt)[:, None]
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y
