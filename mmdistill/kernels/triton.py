"""mamba-ssm's Mamba-2 Triton kernels on CUDA, imported lazily.

mamba-ssm 2.3.2.post1 built without its CUDA extension (the only way it installs on our GPU
machines, see docs/install.md) still has the Mamba-2 Triton kernels, but its package ``__init__``
imports the Mamba-1 extension ``selective_scan_cuda`` unconditionally. When that extension is
absent we register an empty module of that name first, which lets the Triton modules import; the
real extension is never shadowed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings

import torch

from .naive import expand_groups

INSTALL_HINT = (
    "MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation "
    "mamba-ssm==2.3.2.post1"
)

_state: dict = {"loaded": False, "error": None, "warned": False, "fns": None}


def _load() -> None:
    if _state["loaded"]:
        return
    _state["loaded"] = True
    try:
        if (
            "selective_scan_cuda" not in sys.modules
            and importlib.util.find_spec("selective_scan_cuda") is None
        ):
            sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        norm = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
        _state["fns"] = (ssd.mamba_chunk_scan_combined, ssu.selective_state_update)
        _state["rmsnorm_fn"] = norm.rmsnorm_fn
    except Exception as exc:  # any import-time failure means "not available"
        _state["error"] = f"{type(exc).__name__}: {exc}"


def available(warn: bool = False) -> bool:
    """Whether the Triton kernels import. With ``warn``, warn once (naming the install) if not."""
    _load()
    ok = _state["fns"] is not None
    if not ok and warn and not _state["warned"] and torch.cuda.is_available():
        _state["warned"] = True
        warnings.warn(
            "CUDA is available but mamba-ssm's Triton kernels are not; using the slower PyTorch "
            f"SSD. Install them with: {INSTALL_HINT} ({_state['error']})",
            stacklevel=3,
        )
    return ok


def _require() -> dict:
    """The loaded kernels; raises ``RuntimeError`` naming the install when they are missing."""
    _load()
    if _state["fns"] is None:
        raise RuntimeError(f"mamba-ssm's Triton kernels are not available: {INSTALL_HINT}")
    return _state


def import_error() -> str | None:
    _load()
    return _state["error"]


def ssd_triton(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size=64,
    D=None,
    dt_bias=None,
    dt_softplus=True,
    initial_state=None,
    return_final_state=False,
):
    """``mamba_chunk_scan_combined``; B and C are expanded to one group per head because the
    kernel needs equal group counts (C is per head already for seeded mixers)."""
    chunk_scan, _ = _require()["fns"]
    h = x.shape[2]
    if B.shape[2] != C.shape[2]:
        B, C = expand_groups(B, h, 2), expand_groups(C, h, 2)
    out = chunk_scan(
        x.contiguous(),
        dt.contiguous(),
        A.float(),
        B.contiguous(),
        C.contiguous(),
        chunk_size,
        D=None if D is None else D.float(),
        dt_bias=None if dt_bias is None else dt_bias.float(),
        initial_states=None if initial_state is None else initial_state.float(),
        dt_softplus=dt_softplus,
        return_final_states=return_final_state,
    )
    if return_final_state:
        y, final = out
        return y, final.float()
    return out


def ssd_step_triton(state, x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=True):
    """``selective_state_update`` with the per-head scalars tied across ``p`` and ``n``.

    dt stays in float32 (casting it to ``x.dtype`` would round the step size to bf16), and a
    zero ``dt_bias`` stands in for a missing one: the kernel's tied-scalar fast path reads the
    bias's stride and fails on ``None``.
    """
    _, state_update = _require()["fns"]
    h, p = x.shape[1], x.shape[2]
    n = state.shape[-1]
    if B.shape[1] != C.shape[1]:
        B, C = expand_groups(B, h, 1), expand_groups(C, h, 1)
    A_t = A.float()[:, None, None].expand(h, p, n)
    dt_t = dt.float()[:, :, None].expand(-1, h, p)
    bias = dt.new_zeros(h, dtype=torch.float32) if dt_bias is None else dt_bias.float()
    D_t = None if D is None else D.float()[:, None].expand(h, p)
    return state_update(
        state,
        x,
        dt_t,
        A_t,
        B,
        C,
        D=D_t,
        dt_bias=bias[:, None].expand(h, p),
        dt_softplus=dt_softplus,
    )


def gated_rmsnorm_triton(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    gate_before: bool,
) -> torch.Tensor:
    """mamba-ssm's fused gated RMSNorm (forward and backward in Triton).

    Args:
        y: ``[..., h*p]`` values to normalise per group of ``group_size`` channels.
        z: gate, same shape (any row stride, last dim contiguous).
        weight: ``[h*p]``; gate_before: ``norm(y * silu(z))`` (else ``norm(y) * silu(z)``).

    Returns:
        ``y.dtype`` tensor of ``y``'s shape.
    """
    return _require()["rmsnorm_fn"](
        y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=not gate_before
    )
