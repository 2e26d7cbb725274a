"""Reference SSD: the recurrence evaluated one time step at a time.

Slow and obviously correct; tests compare every fast path against it (in float64). The single
step :func:`ssd_step_naive` doubles as the PyTorch decode path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool) -> torch.Tensor:
    """``softplus(dt + dt_bias)`` in at least float32 (float64 stays float64)."""
    dt = dt.to(torch.promote_types(dt.dtype, torch.float32))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


def expand_groups(t: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """Repeat each of the ``g`` groups along ``dim`` so there is one per head (``heads % g == 0``)."""
    groups = t.shape[dim]
    if heads % groups:
        raise ValueError(f"{heads} heads cannot share {groups} B/C groups evenly")
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=dim)


def ssd_step_naive(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
) -> torch.Tensor:
    """One recurrence step; ``state`` ``[b, h, p, n]`` is updated in place. Returns ``[b, h, p]``."""
    h = x.shape[1]
    cdt = state.dtype
    dt = prepare_dt(dt, dt_bias, dt_softplus).to(cdt)  # [b, h]
    Bh = expand_groups(B, h, 1).to(cdt)  # [b, h, n]
    Ch = expand_groups(C, h, 1).to(cdt)
    xf = x.to(cdt)
    decay = torch.exp(dt * A.to(cdt))  # [b, h]
    new = state * decay[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + xf * D.to(cdt)[:, None]
    return y.to(x.dtype)


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Whole-sequence SSD by explicit recurrence; shapes as :func:`mmdistill.kernels.ssd`.

    Differentiable (no in-place ops on autograd tensors), so it also serves as the gradient
    reference.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    cdt = torch.promote_types(x.dtype, torch.float32)
    dt = prepare_dt(dt, dt_bias, dt_softplus).to(cdt)
    Bh = expand_groups(B, h, 2).to(cdt)
    Ch = expand_groups(C, h, 2).to(cdt)
    xf = x.to(cdt)
    A = A.to(cdt)
    if initial_state is None:
        state = x.new_zeros(b, h, p, n, dtype=cdt)
    else:
        state = initial_state.to(cdt)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)
        state = (
            state * decay[..., None, None]
            + (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + xf * D.to(cdt)[:, None]
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y
