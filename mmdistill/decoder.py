"""Canonical decoder pieces shared by every teacher and student: RMSNorm, RoPE, GQA attention
with a KV cache, SwiGLU MLP and the pre-norm decoder layer whose token mixer is either attention
or a :class:`~mmdistill.mixer.Mamba2Mixer`.

Teacher adapters translate Llama/Mistral/Qwen2/InternLM2/HoVLE checkpoints into these modules, so
a teacher and its student run the same code except for the mixers that seeding replaces.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias

from .kernels import ssd_mamba_ssm as triton_backend
from .kernels.attention import decode_attention
from .kernels.inference import DecodeLinear, inference_kernels, tracks_grad
from .mixer import TEACHER_FIELDS, Mamba2Mixer, MixerConfig, MixerState, at_least_fp32

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# SDPA implementations allowed when attention reads a KV cache (see Attention.forward).
CACHED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class StackConfig:
    """One homogeneous run of decoder layers (a plain LM has one; HoVLE has two).

    Attributes:
        name: label, e.g. ``"llm"`` or ``"embedding"``.
        num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: sizes.
        rms_norm_eps: epsilon of every RMSNorm in the stack.
        rope_theta: RoPE base; ``rope_scaling`` an HF-style dict (``rope_type`` in
            :data:`ROPE_TYPES`) or ``None``.
        qkv_bias, o_bias, mlp_bias: which projections have biases.
        qk_norm: an RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3).
        attn_scale: the attention's score scale (``None``: ``head_dim ** -0.5``; Gemma:
            ``query_pre_attn_scalar ** -0.5``).
        attn_softcap: scores become ``cap * tanh(scores / cap)`` before the softmax (Gemma 2).
        sandwich_norms: RMSNorms on the attention and MLP outputs too, before each residual add
            (Gemma 2/3: ``post_mixer_norm``, ``post_mlp_norm``).
        hidden_act: MLP activation (key of :data:`ACTIVATIONS`).
        sliding_window: attention window in tokens, or ``None``.
        max_position_embeddings: the teacher's trained context (used by dynamic RoPE scaling).
        l2_normalize_input: divide the residual stream entering this stack by its L2 norm
            (HoVLE's ``normalize_encoder_output`` between its embedding module and LLM).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attn_scale: float | None = None
    attn_softcap: float | None = None
    sandwich_norms: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    name: str = "llm"
    l2_normalize_input: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer; got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported ({list(ACTIVATIONS)})"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {self.rope_type!r} is not supported ({ROPE_TYPES})"
            )

    @property
    def rope_type(self) -> str:
        """The RoPE scaling type (HF's ``rope_type``, or its older ``type``; ``default``)."""
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StackConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown stack config keys: {', '.join(unknown)}")
        return cls(**data)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 (float64 stays float64), cast back before the weight (Llama/InternLM2
    order): the PyTorch definition every fused path is checked against."""
    xf = at_least_fp32(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a weight.

    Two inputs run fused kernels with the same arithmetic instead of PyTorch's several kernels:

    * a float32 input on CUDA with autograd on (a training student's residual stream) runs
      mamba-ssm's fused Triton kernel, one kernel forward and one backward (a stage-3 step at
      HoVLE-2.6B shapes runs 65 such norms);
    * inference on CUDA (:func:`inference_kernels`) runs
      :func:`~mmdistill.kernels.triton_decoder.add_rms_norm`, which keeps the rounding before
      the weight that the teachers' reference implementations share, and which
      :meth:`add_and_norm` also gives the residual add before the norm.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            from .kernels.triton_decoder import add_rms_norm

            return add_rms_norm(x, None, self.weight, self.eps)[1]
        if (
            x.is_cuda
            and x.dtype == torch.float32
            and torch.is_grad_enabled()
            and triton_backend.available()
        ):
            return triton_backend.gated_rmsnorm_triton(
                x, None, self.weight, self.eps, x.shape[-1], False
            )
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, self(x + delta))``, in one kernel where :meth:`forward` fuses."""
        if self._fused(x, delta) and delta.dtype == x.dtype and delta.shape == x.shape:
            from .kernels.triton_decoder import add_rms_norm

            return add_rms_norm(x, delta, self.weight, self.eps)
        total = x + delta
        return total, self(total)

    def _fused(self, x: torch.Tensor, *more: torch.Tensor) -> bool:
        if not inference_kernels(x, self.weight, *more):
            return False
        from .kernels.triton_decoder import MAX_WIDTH

        return x.shape[-1] <= MAX_WIDTH


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention) with HF's scaling variants.

    ``yarn`` and ``longrope`` also scale cos and sin by an attention factor; ``longrope`` uses
    its ``long_factor`` frequencies for a call whose positions pass
    ``original_max_position_embeddings`` and its ``short_factor`` ones otherwise, as
    transformers does per forward call. So with LongRoPE a prompt prefilled in chunks that start
    below the switch keeps short-factor keys and differs from the same prompt in one pass (in
    transformers too).
    """

    def __init__(self, config: StackConfig):
        super().__init__()
        self.config = config
        scaling = dict(config.rope_scaling or {})
        self.rope_type = config.rope_type
        self.scaling = scaling
        self.original_max = scaling.get(
            "original_max_position_embeddings", config.max_position_embeddings
        )
        self.attention_factor = self._attention_factor()
        self.reset_frequencies()

    def reset_frequencies(self, device=None) -> None:
        """(Re)build the float32 frequency buffers, whatever the weights' dtype, on ``device``
        (e.g. after a model was built on the meta device): ``inv_freq``, and for LongRoPE
        ``long_inv_freq``, the frequencies past ``original_max_position_embeddings``."""
        theta = self.config.rope_theta
        self.register_buffer("inv_freq", self._inv_freq(theta).to(device), persistent=False)
        if self.rope_type == "longrope":
            long = self._inv_freq(theta, long=True).to(device)
            self.register_buffer("long_inv_freq", long, persistent=False)

    def _attention_factor(self) -> float:
        s, kind = self.scaling, self.rope_type
        if kind not in ("yarn", "longrope"):
            return 1.0
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        factor = s.get("factor") or self.config.max_position_embeddings / self.original_max
        if factor <= 1:
            return 1.0
        if kind == "longrope":
            return math.sqrt(1 + math.log(factor) / math.log(self.original_max))
        if s.get("mscale") and s.get("mscale_all_dim"):
            return (0.1 * s["mscale"] * math.log(factor) + 1) / (
                0.1 * s["mscale_all_dim"] * math.log(factor) + 1
            )
        return 0.1 * math.log(factor) + 1.0

    def _inv_freq(self, base: float, long: bool = False) -> torch.Tensor:
        d = self.config.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        inv = 1.0 / (base**exponents)
        if self.rope_type == "llama3":
            inv = self._llama3(inv)
        elif self.rope_type == "yarn":
            inv = self._yarn(base, exponents)
        elif self.rope_type == "longrope":
            factors = self.scaling["long_factor" if long else "short_factor"]
            inv = 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponents)
        return inv

    def _dynamic_inv_freq(self, seq_len: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        """Dynamic NTK scaling (as transformers applies it): past ``max_position_embeddings``
        the base grows with the call's longest position ``seq_len``. Computed on the device,
        without reading ``seq_len`` on the host, so a captured decode step can run it."""
        max_pos, d = self.config.max_position_embeddings, self.config.head_dim
        factor = self.scaling["factor"]
        grown = (factor * seq_len.double().clamp(min=max_pos) / max_pos) - (factor - 1)
        base = (self.config.rope_theta * grown ** (d / (d - 2))).float()
        exponents = torch.arange(0, d, 2, dtype=torch.int64, device=inv.device).float() / d
        return torch.where(seq_len > max_pos, 1.0 / (base**exponents), inv)

    def _llama3(self, inv: torch.Tensor) -> torch.Tensor:
        s = self.scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_ctx / low, old_ctx / high
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled)

    def _yarn(self, base: float, exponents: torch.Tensor) -> torch.Tensor:
        """YaRN: interpolated frequencies below a ramp over the head's dimensions, original
        ones above it (the ramp between ``beta_slow`` and ``beta_fast`` rotations)."""
        s, d = self.scaling, self.config.head_dim
        factor = s.get("factor") or self.config.max_position_embeddings / self.original_max

        def dim_of(rotations: float) -> float:
            return (
                d * math.log(self.original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))
            )

        low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = (torch.arange(d // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)
        keep = 1 - ramp.clamp(0, 1)
        pos = base**exponents
        return (1.0 / (factor * pos)) * (1 - keep) + (1.0 / pos) * keep

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` ``[b, l]`` -> cos, sin ``[b, l, head_dim]``."""
        inv = self.inv_freq.to(positions.device)
        pos = positions.float()
        if self.rope_type == "linear":
            pos = pos / self.scaling["factor"]
        elif self.rope_type == "dynamic":
            inv = self._dynamic_inv_freq(positions.max() + 1, inv)
        elif self.rope_type == "longrope":
            long = self.long_inv_freq.to(positions.device)
            inv = torch.where(positions.max() + 1 > self.original_max, long, inv)
        freqs = pos[..., None] * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[b, heads, l, d]``; cos/sin ``[b, l, d]``."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclass
class KVState:
    """KV cache of one attention layer: ``k``, ``v`` ``[b, kv_heads, t, head_dim]``.

    Growing by default (each update concatenates, as transformers' dynamic cache does). Built
    with :meth:`static`, it writes into preallocated ``[b, kv_heads, capacity, head_dim]``
    buffers instead, and ``k``/``v`` are views of the filled prefix (no copy per token).

    A static cache can also keep its fill level on the device (:meth:`track_on_device`): a
    one-token update then writes at :attr:`slot` and advances it in place, so a decode step
    replayed from a CUDA graph keeps appending. Such an update leaves ``length``, the Python
    count, to the caller (:meth:`advance`; :class:`~mmdistill.graph_decode.GraphDecoder` does
    it after each step): read inside the step, it would be frozen into the captured graph and
    would specialise a compiled step on its value.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    k_buffer: torch.Tensor | None = None
    v_buffer: torch.Tensor | None = None
    length: int = 0
    slot: torch.Tensor | None = None  # [1] long: device copy of ``length`` (graph decode)

    @classmethod
    def static(
        cls, batch: int, kv_heads: int, capacity: int, head_dim: int, device, dtype
    ) -> KVState:
        """A preallocated cache for up to ``capacity`` tokens."""
        if capacity < 1:
            raise ValueError(f"capacity must be a positive number of tokens; got {capacity}")
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(
            k_buffer=torch.zeros(shape, device=device, dtype=dtype),
            v_buffer=torch.zeros(shape, device=device, dtype=dtype),
        )

    @property
    def capacity(self) -> int | None:
        """Preallocated length in tokens, or ``None`` for a growing cache."""
        return None if self.k_buffer is None else self.k_buffer.shape[2]

    def track_on_device(self) -> None:
        """Keep the fill level in :attr:`slot` too (static caches only)."""
        if self.k_buffer is None:
            raise ValueError("only a static KV cache can track its length on the device")
        self.slot = torch.full((1,), self.length, dtype=torch.long, device=self.k_buffer.device)

    @property
    def decodes_on_device(self) -> bool:
        """One-token updates write at :attr:`slot` (see :meth:`track_on_device`)."""
        return self.slot is not None

    def check_room(self, new: int) -> None:
        """Raise before ``new`` more tokens would overflow a static cache."""
        if self.k_buffer is not None and self.length + new > self.k_buffer.shape[2]:
            raise ValueError(
                f"static KV cache is full: {self.length} + {new} tokens exceed its capacity "
                f"of {self.k_buffer.shape[2]}"
            )

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` ``[b, kv_heads, l, head_dim]``; returns everything cached so far
        (with a device-tracked length and one token: the whole buffers, see :attr:`slot`)."""
        new = k.shape[2]
        if self.decodes_on_device and new == 1:
            self.k_buffer.index_copy_(2, self.slot, k)
            self.v_buffer.index_copy_(2, self.slot, v)
            self.slot.add_(1)
            return self.k_buffer, self.v_buffer
        if self.k_buffer is not None:
            self.check_room(new)
            end = self.length + new
            self.k_buffer[:, :, self.length : end] = k
            self.v_buffer[:, :, self.length : end] = v
            self.k, self.v = self.k_buffer[:, :, :end], self.v_buffer[:, :, :end]
            if self.slot is not None:
                self.slot.fill_(end)
        elif self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        self.length += new
        return self.k, self.v

    def select(self, index: torch.Tensor) -> None:
        """Reorder/select batch rows (new tensors)."""
        if self.k_buffer is not None:
            self.k_buffer = self.k_buffer.index_select(0, index)
            self.v_buffer = self.v_buffer.index_select(0, index)
            self.k = self.k_buffer[:, :, : self.length]
            self.v = self.v_buffer[:, :, : self.length]
        elif self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)

    def advance(self, new: int = 1) -> None:
        """Count ``new`` tokens written at :attr:`slot` (by steps that left ``length`` alone)."""
        self.length += new
        self.k, self.v = self.k_buffer[:, :, : self.length], self.v_buffer[:, :, : self.length]

    def sync_length(self) -> None:
        """Set ``length`` from :attr:`slot` (after eager steps that may have written there,
        e.g. a one-token last prefill chunk)."""
        self.advance(int(self.slot.item()) - self.length)

    def copy_(self, other: KVState) -> None:
        """Copy ``other``'s tokens into this static cache in place (a batch-1 cache is
        broadcast to every row)."""
        if self.k_buffer is None:
            raise ValueError("copy_ needs a static KV cache to copy into")
        self.reset()
        self.check_room(other.length)
        end = other.length
        self.k_buffer[:, :, :end].copy_(other.k.expand_as(self.k_buffer[:, :, :end]))
        self.v_buffer[:, :, :end].copy_(other.v.expand_as(self.v_buffer[:, :, :end]))
        self.advance(end)
        if self.slot is not None:
            self.slot.fill_(end)

    def reset(self) -> None:
        """Forget every token (a static cache keeps its buffers)."""
        self.length = 0
        if self.slot is not None:
            self.slot.zero_()
        if self.k_buffer is None:
            self.k = self.v = None
        else:
            self.k = self.k_buffer[:, :, :0]
            self.v = self.v_buffer[:, :, :0]


@dataclass
class AttnContext:
    """Per-forward inputs shared by the layers of one stack."""

    cos: torch.Tensor
    sin: torch.Tensor
    attn_mask: torch.Tensor | None  # bool [b, 1, q, kv] (True = attend), a CausalBias, or None
    is_causal: bool
    token_mask: torch.Tensor | None  # [b, q] real-token mask for the mixers, or None


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention with RoPE (PyTorch SDPA)."""

    def __init__(self, hidden_size: int, config: StackConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.attn_scale
        self.softcap = config.attn_softcap
        self.q_proj = nn.Linear(
            hidden_size, config.num_heads * config.head_dim, bias=config.qkv_bias
        )
        self.k_proj = nn.Linear(
            hidden_size, config.num_kv_heads * config.head_dim, bias=config.qkv_bias
        )
        self.v_proj = nn.Linear(
            hidden_size, config.num_kv_heads * config.head_dim, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, ctx: AttnContext, state: KVState | None = None
    ) -> torch.Tensor:
        """``x`` ``[b, l, hidden]`` -> ``[b, l, hidden]``; appends to ``state`` when given."""
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, l, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        if state is not None and state.decodes_on_device and l == 1:
            if self.scale is not None or self.softcap is not None:
                raise ValueError("the on-device decode step has the default attention scale only")
            # Graph-replayable decode: attend over the whole static buffer up to its device-side
            # fill level (the callers that track it on the device have no padding or window).
            k_all, v_all = state.update(k, v)
            out = decode_attention(q[:, :, 0], k_all, v_all, state.slot)
            return self.o_proj(out.reshape(b, 1, self.num_heads * self.head_dim))
        if state is not None:
            k, v = state.update(k, v)
        # Reading earlier tokens from a cache, the key length changes at every decode step (and
        # prefill chunk). PyTorch 2.11 on an H100 picks cuDNN attention for these calls, and cuDNN
        # pays a set-up cost for each new key length: 35-60 ms per step against 0.3-0.8 ms with
        # the flash kernel (benchmarks/attn_decode.py, docs/benchmarks.md). Such calls leave
        # cuDNN out; a prompt's first pass (as many keys as queries) keeps the default.
        reads_cache = k.shape[-2] != q.shape[-2]
        if self.softcap is not None:
            out = softcapped_attention(q, k, v, ctx, self.scale, self.softcap)
        else:
            with sdpa_kernel(CACHED_SDPA_BACKENDS) if reads_cache else nullcontext():
                out = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=ctx.attn_mask,
                    is_causal=ctx.is_causal and ctx.attn_mask is None,
                    enable_gqa=self.num_heads != self.num_kv_heads,
                    scale=self.scale,
                )
        return self.o_proj(out.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: AttnContext,
    scale: float | None,
    cap: float,
) -> torch.Tensor:
    """Attention whose scores are capped, ``cap * tanh(scores / cap)``, before a float32 softmax
    (SDPA has no such step). ``q`` ``[b, h, l, d]``, ``k``/``v`` ``[b, kv_h, t, d]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / cap) * cap
    l, t = q.shape[-2], k.shape[-2]
    allowed = ctx.attn_mask
    if allowed is None or isinstance(allowed, CausalBias):
        # no dense mask: lower-right causal (a whole sequence, a chunk after a cache, or one
        # decoded token, which sees every key)
        allowed = torch.ones(l, t, dtype=torch.bool, device=q.device).tril(t - l)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.float().softmax(-1).to(q.dtype)) @ v


class VocabLinear(DecodeLinear):
    """The LM head: ``nn.Linear`` whose output width, on CUDA for more than a few rows, is padded
    to a multiple of :attr:`ALIGN` inside the matmul when it is not one (e.g. InternLM2's
    92,553), then sliced back.

    With an odd vocabulary the logits' leading dimension is not 16-byte aligned, and on an H200
    cuBLAS ran these GEMMs on sm75 kernels: at HoVLE-2.6B shapes (8192 tokens) the three LM-head
    GEMMs of a stage-3 step took 87 of its 467 ms of GPU time, about 12 ms once padded
    (``benchmarks/stages.py --profile``, docs/benchmarks.md). Decode-sized inputs keep the plain
    call: padding copies the whole weight (379 MB at that shape), more than a decode step's
    GEMV reads; a batch-1 step's GEMV runs :class:`~mmdistill.kernels.inference.DecodeLinear`'s
    Triton kernel on CUDA.
    """

    ALIGN = 64
    MIN_ROWS = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.is_cuda and rows >= self.MIN_ROWS and self.out_features % self.ALIGN:
            return padded_linear(x, self.weight, self.bias, self.ALIGN)
        return super().forward(x)


def padded_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, multiple: int
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed with the output width padded to ``multiple`` (zero
    rows), returned as a view of the real columns; gradients flow to the unpadded tensors."""
    pad = -weight.shape[0] % multiple
    weight = F.pad(weight, (0, 0, 0, pad))
    bias = F.pad(bias, (0, pad)) if bias is not None else None
    return F.linear(x, weight, bias)[..., : weight.shape[0] - pad]


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, config: StackConfig):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self._packed: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def pack_projections(self) -> None:
        """Store the gate and up weights (and biases) in one ``[2 * intermediate, hidden]``
        buffer, each projection's parameter a view into it, so that inference runs one GEMM
        (one GEMV at batch 1: 18.4 µs against two of 10.5 at HoVLE-2.6B shapes on an H200).
        As :meth:`~mmdistill.mixer.Mamba2Mixer.pack_projections`: moving the module or loading
        a state dict unpacks it; skipped under LoRA adapters; for inference on CUDA."""
        mods = (self.gate_proj, self.up_proj)
        if self._packed is not None or any(hasattr(m, "base_layer") for m in mods):
            return
        weight = torch.cat([m.weight for m in mods])
        bias = torch.cat([m.bias for m in mods]) if self.gate_proj.bias is not None else None
        width = self.gate_proj.out_features
        for i, m in enumerate(mods):
            m.weight.data = weight[i * width : (i + 1) * width]
            if bias is not None:
                m.bias.data = bias[i * width : (i + 1) * width]
        self._packed = (weight, bias)

    def _apply(self, fn, recurse=True):
        self._packed = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and not tracks_grad(
            x, *self.gate_proj.parameters(), *self.up_proj.parameters()
        ):
            gate, up = F.linear(x, *self._packed).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act is F.silu and inference_kernels(gate, up):
            from .kernels.triton_decoder import silu_mul

            return self.down_proj(silu_mul(gate, up))
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block; ``mixer`` is :class:`Attention` or :class:`Mamba2Mixer`."""

    def __init__(
        self, hidden_size: int, config: StackConfig, mixer_config: MixerConfig | None = None
    ):
        super().__init__()
        self.input_norm = RMSNorm(hidden_size, config.rms_norm_eps)
        self.mixer = (
            Mamba2Mixer(mixer_config)
            if mixer_config is not None
            else Attention(hidden_size, config)
        )
        self.post_norm = RMSNorm(hidden_size, config.rms_norm_eps)
        self.mlp = MLP(hidden_size, config)
        if config.sandwich_norms:
            self.post_mixer_norm = RMSNorm(hidden_size, config.rms_norm_eps)
            self.post_mlp_norm = RMSNorm(hidden_size, config.rms_norm_eps)

    @property
    def is_attention(self) -> bool:
        return isinstance(self.mixer, Attention)

    def pack_projections(self) -> None:
        """Pack the mixer's input projections and the MLP's gate and up projections, each into
        one matrix (for inference on CUDA; see :meth:`MLP.pack_projections`)."""
        if hasattr(self.mixer, "pack_projections"):
            self.mixer.pack_projections()
        self.mlp.pack_projections()

    def run_mixer(self, normed: torch.Tensor, ctx: AttnContext, state) -> torch.Tensor:
        if self.is_attention:
            return self.mixer(normed, ctx, state)
        return self.mixer(normed, state=state, mask=ctx.token_mask)

    def forward(self, x: torch.Tensor, ctx: AttnContext, state=None, capture: bool = False):
        """``x`` ``[b, l, hidden]`` -> ``[b, l, hidden]``.

        With ``capture``, returns ``(x, (mixer input, mixer output))`` instead: the pair travels
        in the return value because wrappers such as DeepSpeed ZeRO-3 rebuild call arguments.
        """
        normed = self.input_norm(x)
        mixed = self.run_mixer(normed, ctx, state)
        sandwich = hasattr(self, "post_mixer_norm")
        out, post = self.post_norm.add_and_norm(
            x, self.post_mixer_norm(mixed) if sandwich else mixed
        )
        fed = self.mlp(post)
        out = out + (self.post_mlp_norm(fed) if sandwich else fed)
        return (out, (normed, mixed)) if capture else out


def mixer_config_for(hidden_size: int, stack: StackConfig, options: dict | None) -> MixerConfig:
    """The mixer that replaces one attention module of ``stack`` (sizes from the teacher)."""
    options = dict(options or {})
    for fixed in TEACHER_FIELDS:
        if fixed in options:
            raise ValueError(f"mixer.{fixed} comes from the teacher and cannot be set")
    return MixerConfig(
        hidden_size=hidden_size,
        num_heads=stack.num_heads,
        num_kv_heads=stack.num_kv_heads,
        head_dim=stack.head_dim,
        qkv_bias=stack.qkv_bias,
        bc_norm=stack.qk_norm,
        out_bias=stack.o_bias,
        norm_eps=options.pop("norm_eps", stack.rms_norm_eps),
        **options,
    )


def new_layer_state(
    layer: DecoderLayer, batch: int, device, dtype, max_length: int | None = None
) -> KVState | MixerState:
    """An empty cache entry for ``layer``.

    Args:
        max_length: preallocate attention layers' KV caches for this many tokens (a static
            cache); ``None`` grows them token by token.
    """
    if layer.is_attention:
        if max_length is None:
            return KVState()
        attn = layer.mixer
        return KVState.static(batch, attn.num_kv_heads, max_length, attn.head_dim, device, dtype)
    return MixerState.zeros(layer.mixer.config, batch, device, dtype)
