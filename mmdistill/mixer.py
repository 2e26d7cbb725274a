"""The seeded Mamba-2 mixer: the module that replaces one attention module (docs/method.md).

Layout, per token (``h`` heads, ``g`` KV heads, head dim ``p``, state size ``n``)::

    z  = W_z  u   [h*p]   output gate (new)
    x  = W_x  u   [g*p]   from W_V, shared by the GQA group
    B  = W_B  u   [g*n]   from W_K, shared by the GQA group
    C  = W_C  u   [h*n]   from W_Q, one per query head
    dt = W_dt u   [h]     step size (new, zero-initialised)
    [x, B, C] <- SiLU(causal depthwise conv([x, B, C]))
    y  = SSD(x (repeated over the group), dt, A, B, C) (+ D x)
    y  = gated per-head RMSNorm(y, z); out = W_O y

Because the conv is depthwise, repeating x/B channels per group gives exactly a standard
Mamba-2 mixer (``in_proj = [z | x | B | C | dt]``), which is how students export.

The mixer takes an optional :class:`MixerState` (conv window + SSM state) that it advances in
place (its tensors keep their storage, so a CUDA graph captured over a decode step stays valid
across prefills), for chunked prefill and one- or few-token decode, and a padding mask so
left-padded batches give the same outputs on their real tokens as unpadded rows.

Two paths compute the same function. The reference path (any device, ``backend`` torch/naive,
or triton with ``use_fused_kernels = False``) is plain PyTorch around :func:`~mmdistill.kernels.ssd`.
The fused path (backend resolving to ``triton``: CUDA with mamba-ssm) reads the packed
in-projection once: a Triton conv kernel writes x/B/C straight into the SSD kernel's layout,
mamba-ssm's chunked scan and gated RMSNorm follow, and a decode step is two Triton kernels
between the in- and out-projections (:mod:`mmdistill.kernels.triton_fused`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import BACKENDS, check_backend, resolve_backend, ssd, ssd_step
from .kernels import fused_reference as fused_kernels
from .kernels import ssd_mamba_ssm as triton_backend
from .kernels.inference import DecodeLinear, linear

GATE_ORDERS = ("before_norm", "after_norm")
# SSD chunk length per concrete backend when the config leaves it open. mamba-ssm's kernels use
# 256 (their own default): at 128k tokens on an H100 the mixer forward took 11.75 ms against
# 12.94 ms with 64 (docs/benchmarks.md). The PyTorch SSD's intra-chunk work grows with the chunk,
# so the CPU path keeps 64.
CHUNK_DEFAULTS = {"triton": 256, "torch": 64, "naive": 64}


# MixerConfig fields a seeded mixer takes from the teacher's attention (never set by a recipe).
TEACHER_FIELDS = (
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "qkv_bias",
    "bc_norm",
    "out_bias",
)


@dataclass
class MixerConfig:
    """Sizes and options of one :class:`Mamba2Mixer`; serialised into student configs.

    Attributes:
        hidden_size: model width.
        num_heads: SSM heads (= the teacher's query heads).
        num_kv_heads: groups sharing x and B (= the teacher's KV heads).
        head_dim: ``p``, channels per head of x (= teacher head_dim).
        d_state: ``n``, state size per head (= teacher head_dim when seeded).
        conv_kernel: causal depthwise conv width (mmMamba: 2).
        gate_order: ``before_norm`` (standard Mamba-2, exportable) or ``after_norm`` (mmMamba).
        use_D: add a ``D * x`` skip (zero-initialised).
        qkv_bias: biases on the C/B/x projections (Qwen2-style teachers).
        bc_norm: a per-head RMSNorm on the B and C projections before the conv (seeded from the
            k/q norms of teachers that have them, e.g. Qwen3).
        out_bias: bias on out_proj.
        norm_eps: epsilon of the gated RMSNorm (and of the B/C norms).
        chunk_size: SSD chunk length; ``None`` (default) picks one per backend
            (:data:`CHUNK_DEFAULTS`). The result does not depend on it, only speed and memory.
        backend: SSD implementation, see :data:`mmdistill.kernels.BACKENDS`.
        dt_min, dt_max: range of the log-uniform initial step size.
        A_log_init: initial ``A_log`` (A = -exp(A_log)).
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_state: int | None = None
    conv_kernel: int = 2
    gate_order: str = "before_norm"
    use_D: bool = False
    qkv_bias: bool = False
    bc_norm: bool = False
    out_bias: bool = False
    norm_eps: float = 1e-5
    chunk_size: int | None = None
    backend: str = "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    A_log_init: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_state is None:
            self.d_state = self.head_dim
        for name in (
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "d_state",
            "conv_kernel",
            "chunk_size",
        ):
            value = getattr(self, name)
            if name == "chunk_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.gate_order not in GATE_ORDERS:
            raise ValueError(f"gate_order must be one of {GATE_ORDERS}; got {self.gate_order!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max; got {self.dt_min}, {self.dt_max}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive; got {self.norm_eps}")

    def chunk_for(self, backend: str) -> int:
        """The SSD chunk length used with the concrete ``backend``."""
        return self.chunk_size or CHUNK_DEFAULTS[backend]

    @property
    def conv_dim(self) -> int:
        """Channels of the conv over [x, B, C] (computed, never assumed to be 2·hidden)."""
        return self.num_kv_heads * (self.head_dim + self.d_state) + self.num_heads * self.d_state

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MixerConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown mixer config keys: {', '.join(unknown)}")
        return cls(**known)


@dataclass
class MixerState:
    """Recurrent cache of one mixer.

    Attributes:
        conv: ``[b, conv_dim, conv_kernel - 1]`` last conv inputs (pre-activation).
        ssm: ``[b, h, p, n]`` float32 SSM state.
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def zeros(cls, config: MixerConfig, batch: int, device, dtype) -> MixerState:
        return cls(
            conv=torch.zeros(
                batch, config.conv_dim, config.conv_kernel - 1, device=device, dtype=dtype
            ),
            ssm=torch.zeros(
                batch,
                config.num_heads,
                config.head_dim,
                config.d_state,
                device=device,
                dtype=torch.float32,
            ),
        )

    def select(self, index: torch.Tensor) -> None:
        """Reorder/select batch rows (beam search, dropping finished rows); new tensors."""
        self.conv = self.conv.index_select(0, index)
        self.ssm = self.ssm.index_select(0, index)

    def reset(self) -> None:
        """Zero the state in place (a fresh sequence, same buffers)."""
        self.conv.zero_()
        self.ssm.zero_()

    def copy_(self, other: MixerState) -> None:
        """Copy ``other``'s state into these tensors in place (a batch-1 state is broadcast)."""
        self.conv.copy_(other.conv.expand_as(self.conv))
        self.ssm.copy_(other.ssm.expand_as(self.ssm))


def _assign_(current: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The next value of a state tensor: written into ``current`` (same storage) when shapes and
    dtypes agree and no gradient is being recorded, else a detached copy of ``new``.

    In place keeps CUDA graphs captured over a decode step valid; with autograd on, the old
    tensor may still be needed by a backward pass, so it is left untouched.
    """
    new = new.detach()
    if not torch.is_grad_enabled() and current.shape == new.shape and current.dtype == new.dtype:
        return current.copy_(new)
    return new.clone()


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over each ``weight.numel()``-wide head of ``x``'s last dimension, computed in
    float32 and cast back before the weight (the teachers' q/k norm order)."""
    heads = x.view(*x.shape[:-1], -1, weight.numel())
    xf = at_least_fp32(heads)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf.to(x.dtype)).view(x.shape)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32; float64 stays float64 (reference tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class Mamba2Mixer(nn.Module):
    """A Mamba-2 mixer with attention-shaped projections (see module docstring)."""

    def __init__(self, config: MixerConfig):
        super().__init__()
        self.config = config
        c = config
        h, g, p, n = c.num_heads, c.num_kv_heads, c.head_dim, c.d_state
        self.c_proj = nn.Linear(c.hidden_size, h * n, bias=c.qkv_bias)
        self.b_proj = nn.Linear(c.hidden_size, g * n, bias=c.qkv_bias)
        self.x_proj = nn.Linear(c.hidden_size, g * p, bias=c.qkv_bias)
        self.z_proj = nn.Linear(c.hidden_size, h * p, bias=False)
        self.dt_proj = nn.Linear(c.hidden_size, h, bias=False)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.conv_kernel, groups=c.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.zeros(h)) if c.use_D else None
        self.norm_weight = nn.Parameter(torch.ones(h * p))
        if c.bc_norm:
            self.b_norm_weight = nn.Parameter(torch.ones(n))
            self.c_norm_weight = nn.Parameter(torch.ones(n))
        self.out_proj = DecodeLinear(h * p, c.hidden_size, bias=c.out_bias)
        self._packed_weight: torch.Tensor | None = None
        self._packed_bias: torch.Tensor | None = None
        self.reset_new_parameters()

    # Fused CUDA kernels when the backend resolves to "triton"; False forces the reference path
    # there too (benchmarks compare the two).
    use_fused_kernels: bool = True

    @torch.no_grad()
    def reset_new_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise the parameters attention does not have, as mmMamba does (docs/method.md)."""
        c = self.config
        self.conv1d.weight.zero_()
        self.conv1d.weight[:, 0, -1] = 1.0  # identity: the conv passes its input through
        self.conv1d.bias.zero_()
        self.dt_proj.weight.zero_()
        u = torch.rand(c.num_heads, generator=generator)
        dt = torch.exp(u * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        self.dt_bias.copy_(inverse_softplus(dt.clamp(min=1e-4)))
        self.A_log.fill_(c.A_log_init)
        if self.D is not None:
            self.D.zero_()
        nn.init.xavier_uniform_(self.z_proj.weight, gain=2**-2.5, generator=generator)
        self.norm_weight.fill_(1.0)

    def _in_modules(self) -> tuple[nn.Linear, ...]:
        """The five input projections in packed order ``[z | x | B | C | dt]``."""
        return (self.z_proj, self.x_proj, self.b_proj, self.c_proj, self.dt_proj)

    @torch.no_grad()
    def pack_projections(self) -> None:
        """Store the five input projections in one ``[h*p + conv_dim + h, hidden]`` buffer.

        Each projection's weight (and bias) becomes a view into the buffer, so inference reads
        one matrix with no per-call concatenation and no second copy of the weights. Gradients
        still reach each parameter (training concatenates as before). Moving the module
        (``.to``), or loading a state dict, unpacks it; call again afterwards. For inference
        and benchmarks on CUDA: on CPU the shared storage would stop safetensors from saving.
        """
        mods = self._in_modules()
        if any(hasattr(m, "base_layer") for m in mods):
            return  # LoRA adapters: each projection runs its own forward (_packed_in_proj)
        if self._packed_weight is not None:
            return  # packed already: a graph captured on this buffer must keep reading it
        weight = torch.cat([m.weight for m in mods])
        bias = None
        if self.config.qkv_bias:
            bias = torch.cat(
                [m.bias if m.bias is not None else weight.new_zeros(m.out_features) for m in mods]
            )
        start = 0
        for m in mods:
            stop = start + m.out_features
            m.weight.data = weight[start:stop]
            if bias is not None and m.bias is not None:
                m.bias.data = bias[start:stop]
            start = stop
        self._packed_weight, self._packed_bias = weight, bias

    def _apply(self, fn, recurse=True):
        self._packed_weight = self._packed_bias = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed_weight = self._packed_bias = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _packed_in_proj(self, u: torch.Tensor) -> torch.Tensor:
        """``[b, l, h*p + conv_dim + h]`` = ``u`` through all five projections in one GEMM.

        With LoRA adapters on the projections (:mod:`mmdistill.task_lora`) each projection runs
        its own forward, so the active adapter applies.
        """
        mods = self._in_modules()
        if any(hasattr(m, "base_layer") for m in mods):
            return torch.cat([m(u) for m in mods], dim=-1)
        weight, bias = self._packed_weight, self._packed_bias
        needs_grad = torch.is_grad_enabled() and any(m.weight.requires_grad for m in mods)
        if weight is None or needs_grad:
            weight = torch.cat([m.weight for m in mods])
            bias = None
            if self.config.qkv_bias:
                bias = torch.cat(
                    [
                        m.bias if m.bias is not None else weight.new_zeros(m.out_features)
                        for m in mods
                    ]
                )
        return linear(u, weight, bias)

    def _in_proj(self, u: torch.Tensor) -> torch.Tensor:
        """The packed projection ``[z | x | B | C | dt]``, with B and C normalised per head when
        the mixer has B/C norms."""
        zxbcdt = self._packed_in_proj(u)
        c = self.config
        if not c.bc_norm:
            return zxbcdt
        h, g, p, n = c.num_heads, c.num_kv_heads, c.head_dim, c.d_state
        z, x, B, C, dt = zxbcdt.split([h * p, g * p, g * n, h * n, h], dim=-1)
        B = head_rms_norm(B, self.b_norm_weight, c.norm_eps)
        C = head_rms_norm(C, self.c_norm_weight, c.norm_eps)
        return torch.cat([z, x, B, C, dt], dim=-1)

    def _conv(self, xbc: torch.Tensor, state: MixerState | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU over ``xbc`` ``[b, l, conv_dim]``; advances ``state``."""
        k = self.config.conv_kernel
        seq = xbc.transpose(1, 2)  # [b, c, l]
        if state is not None:
            seq = torch.cat([state.conv.to(seq.dtype), seq], dim=-1)
            if k > 1:
                state.conv = _assign_(state.conv, seq[..., -(k - 1) :])
        else:
            seq = F.pad(seq, (k - 1, 0))
        out = F.conv1d(seq, self.conv1d.weight, self.conv1d.bias, groups=self.config.conv_dim)
        return F.silu(out).transpose(1, 2)

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm with the SiLU gate before (standard) or after (mmMamba) the norm."""
        c = self.config
        shape = y.shape
        yf = at_least_fp32(y)
        gate = F.silu(at_least_fp32(z))
        if c.gate_order == "before_norm":
            yf = yf * gate
        yf = yf.view(*shape[:-1], c.num_heads, c.head_dim)
        yf = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + c.norm_eps)
        yf = yf.view(shape) * at_least_fp32(self.norm_weight)
        if c.gate_order == "after_norm":
            yf = yf * gate
        return yf.to(y.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: MixerState | None = None,
        mask: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Mix a sequence.

        Args:
            hidden_states: ``[b, l, hidden]``.
            state: recurrent cache to start from and advance in place, or ``None`` (zeros,
                nothing kept).
            mask: ``[b, l]`` with 1 for real tokens and 0 for padding, or ``None``. Padding adds
                nothing to the state and does not decay it.
            backend: overrides ``config.backend`` for this call.

        Returns:
            ``[b, l, hidden]``.
        """
        backend = check_backend(backend or self.config.backend)
        if self.use_fused_kernels and resolve_backend(backend, hidden_states.device) == "triton":
            return self._forward_fused(hidden_states, state, mask)
        return self._forward_reference(hidden_states, state, mask, backend)

    def _forward_reference(
        self,
        hidden_states: torch.Tensor,
        state: MixerState | None,
        mask: torch.Tensor | None,
        backend: str,
    ) -> torch.Tensor:
        """The PyTorch path around :func:`~mmdistill.kernels.ssd` (arguments as ``forward``)."""
        c = self.config
        b, l, _ = hidden_states.shape
        h, g, p, n = c.num_heads, c.num_kv_heads, c.head_dim, c.d_state
        z, xbc, dt = self._in_proj(hidden_states).split([h * p, c.conv_dim, h], dim=-1)
        keep = None
        if mask is not None:
            keep = mask.to(xbc.dtype)[..., None]
            xbc = xbc * keep
        xbc = self._conv(xbc, state)
        if keep is not None:
            xbc = xbc * keep
        x, B, C = xbc.split([g * p, g * n, h * n], dim=-1)
        # softplus is applied here rather than in the kernel so that padding can set dt to 0.
        dt = F.softplus(at_least_fp32(dt) + at_least_fp32(self.dt_bias))
        if mask is not None:
            dt = dt * mask.to(dt.dtype)[..., None]
        A = -torch.exp(at_least_fp32(self.A_log))
        x = x.reshape(b, l, g, p).repeat_interleave(h // g, dim=2)
        B = B.reshape(b, l, g, n)
        C = C.reshape(b, l, h, n)
        D = self.D
        if state is not None and l == 1:
            y = ssd_step(
                state.ssm,
                x[:, 0],
                dt[:, 0],
                A,
                B[:, 0],
                C[:, 0],
                D=D,
                dt_softplus=False,
                backend=backend,
            )[:, None]
        else:
            out = ssd(
                x,
                dt,
                A,
                B,
                C,
                D=D,
                dt_softplus=False,
                initial_state=None if state is None else state.ssm,
                return_final_state=state is not None,
                chunk_size=c.chunk_for(resolve_backend(backend, x.device)),
                backend=backend,
            )
            if state is None:
                y = out
            else:
                y, final = out
                state.ssm = _assign_(state.ssm, final)
        y = self._gated_norm(y.reshape(b, l, h * p), z)
        return self.out_proj(y)

    def _forward_fused(
        self, hidden_states: torch.Tensor, state: MixerState | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The CUDA path: packed in-projection, Triton conv, mamba-ssm SSD and gated norm."""
        c = self.config
        b, l, _ = hidden_states.shape
        h, p = c.num_heads, c.head_dim
        zxbcdt = self._in_proj(hidden_states)
        if state is not None and l == 1 and mask is None and self._can_decode_fused(state):
            return self.out_proj(self._decode_fused(zxbcdt[:, 0], state)[:, None])
        z, xbc, dt = zxbcdt.split([h * p, c.conv_dim, h], dim=-1)
        keep = None
        if mask is not None:
            keep = mask.to(xbc.dtype)[..., None]
            xbc = xbc * keep
        x, B, C = self._conv_fused(xbc, state)
        if keep is not None:
            x, B, C = (t * keep[..., None] for t in (x, B, C))
        y = self._ssd_stage(x, B, C, dt, mask, state)
        y = triton_backend.gated_rmsnorm_triton(
            y.view(b, l, h * p),
            z,
            self.norm_weight,
            c.norm_eps,
            p,
            gate_before=c.gate_order == "before_norm",
        )
        return self.out_proj(y)

    def _conv_fused(
        self, xbc: torch.Tensor, state: MixerState | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Triton conv + SiLU of ``xbc`` ``[b, l, conv_dim]`` into x ``[b, l, h, p]``, B and C
        ``[b, l, h, n]`` (x and B repeated over the group); advances ``state.conv``."""
        from .kernels.triton_fused import conv_silu_expand

        c = self.config
        k = c.conv_kernel
        # With autograd on, _assign_ leaves the old state tensor (saved for backward) untouched.
        initial = None if state is None or k == 1 else state.conv
        out = conv_silu_expand(
            xbc,
            self.conv1d.weight,
            self.conv1d.bias,
            initial,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.d_state,
        )
        if state is not None and k > 1:
            tail = xbc[:, -(k - 1) :].transpose(1, 2)
            if tail.shape[-1] < k - 1:
                tail = torch.cat([state.conv.to(tail.dtype), tail], dim=-1)[..., -(k - 1) :]
            state.conv = _assign_(state.conv, tail)
        return out

    def _ssd_stage(
        self,
        x: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        dt: torch.Tensor,
        mask: torch.Tensor | None,
        state: MixerState | None,
    ) -> torch.Tensor:
        """The fused path's SSD step: dt and A, then mamba-ssm's chunked scan.

        Args:
            x: ``[b, l, h, p]``; B, C: ``[b, l, h, n]`` (the conv kernel's layout).
            dt: ``[b, l, h]`` raw step sizes (before ``dt_bias`` and softplus).
            mask: ``[b, l]`` padding mask or ``None``; state: advanced in place when given.

        Returns:
            ``y`` ``[b, l, h, p]`` in ``x.dtype``.
        """
        c = self.config
        dt = F.softplus(at_least_fp32(dt) + at_least_fp32(self.dt_bias))
        if mask is not None:
            dt = dt * mask.to(dt.dtype)[..., None]
        A = -torch.exp(at_least_fp32(self.A_log))
        if state is None:
            return triton_backend.ssd_triton(
                x, dt, A, B, C, chunk_size=c.chunk_for("triton"), D=self.D, dt_softplus=False
            )
        y, final = triton_backend.ssd_triton(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=c.chunk_for("triton"),
            D=self.D,
            dt_softplus=False,
            initial_state=state.ssm,
            return_final_state=True,
        )
        state.ssm = _assign_(state.ssm, final)
        return y

    def _can_decode_fused(self, state: MixerState) -> bool:
        """The Triton decode step needs a float32 state and no gradient through the step."""
        if state.ssm.dtype != torch.float32 or state.ssm.stride(-1) != 1:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def _decode_fused(self, zxbcdt: torch.Tensor, state: MixerState) -> torch.Tensor:
        """Two Triton kernels from the packed projection ``[b, total]`` to ``[b, h*p]``."""
        c = self.config
        args = (
            zxbcdt,
            state.conv,
            state.ssm,
            self.conv1d.weight,
            self.conv1d.bias,
            self.dt_bias,
            self.A_log,
            self.D,
            self.norm_weight,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.d_state,
            c.norm_eps,
            c.gate_order == "before_norm",
        )
        if torch.compiler.is_compiling():
            return fused_kernels.mixer_decode_step(*args)  # opaque custom op for the compiler
        from .kernels.triton_fused import mixer_decode_step

        return mixer_decode_step(*args)
