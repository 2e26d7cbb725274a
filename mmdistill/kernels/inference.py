"""When inference takes the Triton kernels of the decoder block, and the linear layer that does.

:func:`inference_kernels` is the one test: a CUDA tensor of a dtype the kernels take, no
gradient to track, not inside ``torch.compile`` (Inductor fuses and picks its own kernels
there), and Triton importable. :class:`DecodeLinear` is ``nn.Linear`` whose one-row inputs that
pass it (a batch-1 decode step) run :func:`~mmdistill.kernels.triton_gemv.gemv`; every other
input, and every input on CPU, runs ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ssd_mamba_ssm as triton_backend

FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GEMV_DTYPES = (torch.bfloat16, torch.float16)


def tracks_grad(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether autograd records a computation on ``x`` and ``params``."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def inference_kernels(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether ``x`` (and ``params``, which must not need gradients either) takes the decoder
    block's inference kernels (module docstring)."""
    if not x.is_cuda or x.dtype not in FUSED_DTYPES or torch.compiler.is_compiling():
        return False
    return not tracks_grad(x, *params) and triton_backend.available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, through the Triton GEMV for one row of a 16-bit dtype (module docstring)."""
    k = weight.shape[-1]
    one_row = x.numel() == k and weight.stride(-1) == 1
    if one_row and x.dtype in GEMV_DTYPES and weight.dtype == x.dtype:
        params = (weight,) if bias is None else (weight, bias)
        if inference_kernels(x, *params):
            from .triton_gemv import gemv

            return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class DecodeLinear(nn.Linear):
    """``nn.Linear`` that computes through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
