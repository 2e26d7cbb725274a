"""Mamba-2 state-space-duality (SSD) kernels: one computation, three implementations.

``ssd`` computes, for every head ``h`` and time ``t``::

    dt_t  = softplus(dt_raw_t + dt_bias)            (each optional)
    S_t   = exp(dt_t * A) * S_{t-1} + dt_t * x_t ⊗ B_t   S: [p, n], S_{-1} = initial state or 0
    y_t   = S_t · C_t + D * x_t

with B and C shared by contiguous groups of heads (head ``i`` reads group ``i // (h // g)``), which
is how a seeded mixer reads K (per KV head) and Q (per query head).

Implementations:

* :mod:`.naive`   -- per-step recurrence, the reference for tests (float64-capable);
* :mod:`.chunked` -- chunked pure-PyTorch SSD, the CPU path;
* :mod:`.ssd_mamba_ssm` -- mamba-ssm's Triton kernels on CUDA.

``backend`` is ``"auto"`` (Triton on CUDA tensors when mamba-ssm imports, else PyTorch),
``"torch"``, ``"triton"`` or ``"naive"``.
"""

from __future__ import annotations

import torch

from . import chunked, naive
from . import ssd_mamba_ssm as triton_backend

BACKENDS = ("auto", "torch", "triton", "naive")


def check_backend(name: str) -> str:
    """Validate a backend name.

    Raises:
        ValueError: naming the parameter when ``name`` is not one of :data:`BACKENDS`.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """Pick the concrete implementation for ``name`` on ``device``.

    ``auto`` uses Triton on CUDA when mamba-ssm is importable (warning once, naming what to
    install, when it is not) and PyTorch otherwise. Forcing ``triton`` without CUDA or mamba-ssm
    raises ``RuntimeError``.
    """
    check_backend(name)
    if name == "auto":
        if device.type == "cuda" and triton_backend.available(warn=True):
            return "triton"
        return "torch"
    if name == "triton":
        if device.type != "cuda":
            raise RuntimeError("backend='triton' needs CUDA tensors; use 'torch' on CPU")
        if not triton_backend.available(warn=False):
            raise RuntimeError(
                f"backend='triton' needs mamba-ssm: {triton_backend.INSTALL_HINT} "
                f"(import failed: {triton_backend.import_error()})"
            )
    return name


def ssd(
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
    chunk_size: int = 64,
    backend: str = "auto",
):
    """Run SSD over a whole sequence.

    Args:
        x: ``[b, l, h, p]`` inputs.
        dt: ``[b, l, h]`` raw step sizes (before ``dt_bias`` and softplus).
        A: ``[h]`` negative decay rates.
        B: ``[b, l, g_b, n]`` input projections, ``h % g_b == 0``.
        C: ``[b, l, g_c, n]`` output projections, ``h % g_c == 0``.
        D: ``[h]`` skip weights or ``None``.
        dt_bias: ``[h]`` or ``None``.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        initial_state: ``[b, h, p, n]`` or ``None`` (zeros).
        return_final_state: also return the ``[b, h, p, n]`` float32 state after the last step.
        chunk_size: chunk length for the chunked implementations.
        backend: see :data:`BACKENDS`.

    Returns:
        ``y`` of shape ``[b, l, h, p]`` in ``x.dtype``, and the final state when asked.
    """
    impl = resolve_backend(backend, x.device)
    kwargs = dict(
        D=D,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        initial_state=initial_state,
        return_final_state=return_final_state,
    )
    if impl == "triton":
        return triton_backend.ssd_triton(x, dt, A, B, C, chunk_size=chunk_size, **kwargs)
    if impl == "naive":
        return naive.ssd_naive(x, dt, A, B, C, **kwargs)
    return chunked.ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, **kwargs)


def ssd_step(
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
    backend: str = "auto",
) -> torch.Tensor:
    """Advance the recurrence by one token, updating ``state`` in place.

    Args:
        state: ``[b, h, p, n]`` recurrent state (float32), modified in place.
        x: ``[b, h, p]``; dt: ``[b, h]``; B: ``[b, g_b, n]``; C: ``[b, g_c, n]``.

    Returns:
        ``y`` of shape ``[b, h, p]`` in ``x.dtype``.
    """
    impl = resolve_backend(backend, x.device)
    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)
    if impl == "triton":
        return triton_backend.ssd_step_triton(state, x, dt, A, B, C, **kwargs)
    return naive.ssd_step_naive(state, x, dt, A, B, C, **kwargs)


__all__ = ["BACKENDS", "check_backend", "resolve_backend", "ssd", "ssd_step"]
