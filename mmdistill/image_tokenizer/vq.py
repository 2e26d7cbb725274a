"""The LlamaGen VQ model: a convolutional encoder, an L2-normalised codebook, a decoder.

This reproduces the architecture of LlamaGen's image tokenizer (FoundationVision/LlamaGen,
``tokenizer/tokenizer_image/vq_model.py``) with the same module and parameter names, so its
checkpoints load into :class:`VQModel` unchanged:

* ``encoder``: ``conv_in``; ``conv_blocks[i]`` per resolution with ``res[j]``
  (:class:`ResnetBlock`: ``norm1``, ``conv1``, ``norm2``, ``conv2``, ``nin_shortcut`` when the
  width changes), ``attn[j]`` (:class:`AttnBlock`, at the lowest resolution only) and
  ``downsample`` (all but the last); ``mid`` = (ResnetBlock, AttnBlock, ResnetBlock);
  ``norm_out``; ``conv_out`` (to ``z_channels``);
* ``quant_conv`` (``z_channels`` -> ``codebook_embed_dim``), ``quantize.embedding``
  (``codebook_size x codebook_embed_dim``), ``post_quant_conv`` (back to ``z_channels``);
* ``decoder``: ``conv_in``; ``mid``; ``conv_blocks`` from the lowest resolution up, each with
  ``num_res_blocks + 1`` res blocks, ``attn`` at the lowest resolution and ``upsample`` (all but
  the last); ``norm_out``; ``conv_out`` (to RGB).

Normalisation is GroupNorm with 32 groups (so every width must be a multiple of 32), the
activation is SiLU, downsampling is a stride-2 3x3 convolution after padding right and bottom by
one, upsampling is nearest-neighbour x2 then a 3x3 convolution.

``VQConfig.architecture = "patch"`` swaps the encoder and decoder for patch-local ones
(:class:`PatchEncoder`, :class:`PatchDecoder`; not LlamaGen's): each code is computed from its
own ``downsample x downsample`` pixel patch alone and decodes to that patch alone, so an image's
codes do not depend on the rest of the image (LlamaGen's GroupNorm statistics and attention
blocks mix the whole image into every code). The quantiser and the 1x1 convolutions around it
are the same. Their patch side is ``downsample`` (``2 ** (len(ch_mult) - 1)``) and their
width ``ch * ch_mult[-1]``; ``num_res_blocks`` and ``dropout`` do not apply.

**LlamaGen VQ-16** (:data:`LLAMAGEN_VQ16`) has a 16384 x 8 codebook whose vectors, like the
encoder's outputs, are L2-normalised before matching (nearest code = highest cosine
similarity), and downsamples by 16: a 256-pixel image becomes a 16 x 16 grid of 256 codes.
Images are float tensors in [-1, 1], channels first.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_GROUPS = 32  # GroupNorm groups, as in LlamaGen
ARCHITECTURES = ("llamagen", "patch")


@dataclass(frozen=True)
class VQConfig:
    """Sizes of a :class:`VQModel` (LlamaGen's ``ModelArgs`` plus the encoder/decoder widths).

    Attributes:
        codebook_size: number of codes.
        codebook_embed_dim: width of a code vector.
        codebook_l2_norm: L2-normalise codes and encoder outputs before matching.
        z_channels: width of the encoder's output and the decoder's input.
        ch: base width; resolution ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers, one per resolution (the encoder's and the decoder's).
        num_res_blocks: res blocks per resolution in the encoder (the decoder has one more).
        dropout: dropout inside the res blocks.
        commit_loss_beta: weight of the commitment loss.
        image_size: side of the square images the model is used with, in pixels.
        architecture: ``"llamagen"`` (LlamaGen's encoder and decoder, loads its checkpoints) or
            ``"patch"`` (patch-local ones: see the module docstring).
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    commit_loss_beta: float = 0.25
    image_size: int = 256
    architecture: str = "llamagen"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult:
            raise ValueError("ch_mult must name at least one resolution")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}; got {self.architecture!r}"
            )
        narrow = [self.ch * m for m in self.ch_mult if (self.ch * m) % _GROUPS]
        if narrow:
            raise ValueError(
                f"every width ch * ch_mult[i] must be a multiple of {_GROUPS} (GroupNorm "
                f"groups); got {narrow} from ch={self.ch}, ch_mult={self.ch_mult}"
            )
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the downsampling factor "
                f"{self.downsample}"
            )

    @property
    def downsample(self) -> int:
        """Pixels per code along each side: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        """Codes along each side of an ``image_size`` image."""
        return self.image_size // self.downsample

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``ch_mult`` as a list)."""
        out = asdict(self)
        out["ch_mult"] = list(self.ch_mult)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQConfig:
        """The config of :meth:`to_dict`'s output; missing fields take their defaults.

        Raises:
            ValueError: a key that is not a field, or sizes the model cannot have.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown VQConfig key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


LLAMAGEN_VQ16 = VQConfig()
"""LlamaGen's VQ-16: codebook 16384 x 8 (L2-normalised), downsampling 16, 256 px -> 16 x 16."""


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a residual (a 1x1 ``nin_shortcut`` if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (1x1 convs ``q``, ``k``, ``v``, ``proj_out``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (
            conv(y).reshape(n, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # scale c ** -0.5, as LlamaGen
        return x + self.proj_out(out.transpose(2, 3).reshape(n, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution: pad right and bottom by one, then a stride-2 3x3 ``conv``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 ``conv``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks_in: int, width: int, count: int, attn: bool, dropout: float) -> nn.Module:
    """One resolution: ``res`` (``count`` res blocks) and ``attn`` (one per res block or none)."""
    level = nn.Module()
    level.res = nn.ModuleList(
        ResnetBlock(blocks_in if j == 0 else width, width, dropout) for j in range(count)
    )
    level.attn = nn.ModuleList(AttnBlock(width) for _ in range(count if attn else 0))
    return level


def _mid(width: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [ResnetBlock(width, width, dropout), AttnBlock(width), ResnetBlock(width, width, dropout)]
    )


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for j, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


class Encoder(nn.Module):
    """Images ``[n, 3, H, W]`` -> features ``[n, z_channels, H / downsample, W / downsample]``."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        ch, mult, last = config.ch, config.ch_mult, len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        width = ch
        for i, m in enumerate(mult):
            level = _level(width, ch * m, config.num_res_blocks, i == last, config.dropout)
            width = ch * m if config.num_res_blocks else width
            if i != last:
                level.downsample = Downsample(width)
            self.conv_blocks.append(level)
        self.mid = _mid(width, config.dropout)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.conv_blocks):
            h = _run_level(level, h)
            if i != len(self.conv_blocks) - 1:
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features ``[n, z_channels, h, w]`` -> images ``[n, 3, h * downsample, w * downsample]``."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = _mid(width, config.dropout)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            level = _level(
                width, ch * mult[i], config.num_res_blocks + 1, i == len(mult) - 1, config.dropout
            )
            width = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(width)
            self.conv_blocks.append(level)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for i, level in enumerate(self.conv_blocks):
            h = _run_level(level, h)
            if i != len(self.conv_blocks) - 1:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _patch_mlp(widths: list[int]) -> nn.Sequential:
    """1x1 convolutions between ``widths`` with SiLU between them (a per-position MLP)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.SiLU()] if i else []
        layers.append(nn.Conv2d(a, b, 1))
    return nn.Sequential(*layers)


class PatchEncoder(nn.Module):
    """Images ``[n, 3, H, W]`` -> features ``[n, z_channels, H / p, W / p]``, each position
    from its own ``p x p`` patch only (``p = config.downsample``): a stride-``p`` convolution,
    then a per-position MLP."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        width, p = config.ch * config.ch_mult[-1], config.downsample
        self.patch = nn.Conv2d(3, width, p, stride=p)
        self.mlp = _patch_mlp([width, width, config.z_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.silu(self.patch(x)))


class PatchDecoder(nn.Module):
    """Features ``[n, z_channels, h, w]`` -> images ``[n, 3, h * p, w * p]``, each ``p x p``
    patch from its own position only: a per-position MLP, then a stride-``p`` transposed
    convolution."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        width, p = config.ch * config.ch_mult[-1], config.downsample
        self.mlp = _patch_mlp([config.z_channels, width, width])
        self.patch = nn.ConvTranspose2d(width, 3, p, stride=p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.patch(F.silu(self.mlp(z)))


class VectorQuantizer(nn.Module):
    """The codebook, ``embedding`` (``codebook_size x codebook_embed_dim``); calling it
    quantises (``model.quantize(z)``, as in LlamaGen)."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.l2_norm = config.codebook_l2_norm
        self.beta = config.commit_loss_beta
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        n = config.codebook_size
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n, 1.0 / n)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> torch.Tensor:
        """The code vectors as matched (L2-normalised when the config says so)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def forward(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Snap each position of ``z`` (``[n, codebook_embed_dim, h, w]``) to its nearest code.

        With ``codebook_l2_norm`` both ``z`` and the codes are L2-normalised along the channels
        first, so the nearest code is the one of highest cosine similarity.

        Returns:
            ``(z_q, codes, losses)``: ``z_q`` ``[n, c, h, w]``, the (normalised) codes with
            straight-through gradients to ``z``; ``codes`` ``[n, h, w]`` (long); ``losses``
            with ``"codebook"`` (mean squared distance, gradients to the codes) and
            ``"commitment"`` (``beta`` times the same distance, gradients to ``z``).
        """
        n, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        codebook = self.codebook()
        distances = (
            flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.T
        )
        codes = distances.argmin(dim=1)
        chosen = codebook[codes]
        losses = {
            "codebook": F.mse_loss(chosen, flat.detach()),
            "commitment": self.beta * F.mse_loss(flat, chosen.detach()),
        }
        z_q = flat + (chosen - flat).detach()
        return z_q.reshape(n, h, w, c).permute(0, 3, 1, 2), codes.reshape(n, h, w), losses


class VQModel(nn.Module):
    """LlamaGen's VQ tokenizer: ``encoder``, ``quant_conv``, ``quantize`` (the codebook; call it
    to quantise, see :meth:`VectorQuantizer.forward`), ``post_quant_conv``, ``decoder``."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        patch = config.architecture == "patch"
        self.encoder = PatchEncoder(config) if patch else Encoder(config)
        self.decoder = PatchDecoder(config) if patch else Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes ``[n, h, w]`` (long) of images ``[n, 3, H, W]`` in [-1, 1]."""
        return self.quantize(self.quant_conv(self.encoder(images)))[1]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images ``[n, 3, H, W]`` in [-1, 1] (clamped) from codes ``[n, h, w]``."""
        z_q = self.quantize.codebook()[codes].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z_q)).clamp(-1.0, 1.0)

    def forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Training pass: ``(reconstruction, codes, losses)``.

        The reconstruction is not clamped (so every pixel keeps its gradient); ``losses`` is
        :meth:`VectorQuantizer.forward`'s (codebook loss and ``beta`` times the commitment loss, as in
        LlamaGen); the caller adds its reconstruction loss.
        """
        z_q, codes, losses = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(z_q)), codes, losses
