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


# CUDA caps a launch grid's y and z dimensions at 65,535 blocks, and mamba-ssm's SSD kernels put
# batch x chunks or chunks x groups there: one call takes at most 65,535 // max(batch, groups)
# chunks (262,080 tokens at batch 1 with 16 groups of chunk 64; past that the launch fails with
# "invalid argument"). Longer sequences run in segments of whole chunks, each starting from the
# previous segment's final state: the same state passing the kernel does between its chunks.
GRID_LIMIT = 65535
INT32_MAX = 2**31 - 1


def segment_length(batch: int, groups: int, chunk_size: int) -> int:
    """Tokens one ``mamba_chunk_scan_combined`` call can take within :data:`GRID_LIMIT`."""
    return max(1, GRID_LIMIT // max(batch, groups)) * chunk_size


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
    kernel needs equal group counts (C is per head already for seeded mixers). Sequences longer
    than :func:`segment_length` run in segments (see :data:`GRID_LIMIT`)."""
    chunk_scan, _ = _require()["fns"]
    h = x.shape[2]
    if B.shape[2] != C.shape[2]:
        B, C = expand_groups(B, h, 2), expand_groups(C, h, 2)
    kwargs = {
        "D": None if D is None else D.float(),
        "dt_bias": None if dt_bias is None else dt_bias.float(),
        "dt_softplus": dt_softplus,
    }
    length = x.shape[1]
    step = segment_length(x.shape[0], B.shape[2], chunk_size)
    state = None if initial_state is None else initial_state.float()
    ys = []
    for start in range(0, max(length, 1), step):
        part = slice(start, start + step)
        last = start + step >= length
        out = chunk_scan(
            x[:, part].contiguous(),
            dt[:, part].contiguous(),
            A.float(),
            B[:, part].contiguous(),
            C[:, part].contiguous(),
            chunk_size,
            initial_states=state,
            return_final_states=return_final_state or not last,
            **kwargs,
        )
        if return_final_state or not last:
            y, state = out
        else:
            y = out
        ys.append(y)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
    if return_final_state:
        return y, state.float()
    return y


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
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    gate_before: bool,
) -> torch.Tensor:
    """mamba-ssm's fused gated RMSNorm (forward and backward in Triton), computed in float32.

    Args:
        y: ``[..., h*p]`` values to normalise per group of ``group_size`` channels.
        z: gate, same shape (any row stride, last dim contiguous); ``None``: a plain RMSNorm.
        weight: ``[h*p]``; gate_before: ``norm(y * silu(z))`` (else ``norm(y) * silu(z)``).

    Returns:
        ``y.dtype`` tensor of ``y``'s shape.
    """
    norm = _require()["rmsnorm_fn"]
    width = y.shape[-1]
    y2 = y.reshape(-1, width)
    z2 = z.reshape(-1, width) if z is not None else None
    # The kernel offsets rows by ``row * row_stride`` in 32-bit arithmetic (forward and
    # backward), which wraps past 2**31 elements (a 512K-token sequence whose gate is a view into
    # the packed in-projection): long inputs go through in blocks of rows (views, no copies).
    widest = max(y2.stride(0), z2.stride(0) if z2 is not None else 0, width)
    step = max(1, INT32_MAX // widest - 1)
    outs = [
        norm(
            y2[start : start + step],
            weight,
            None,
            z=z2[start : start + step] if z2 is not None else None,
            eps=eps,
            group_size=group_size,
            norm_before_gate=not gate_before,
        )
        for start in range(0, max(y2.shape[0], 1), step)
    ]
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).view(y.shape)
