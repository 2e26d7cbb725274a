"""HoVLE's vision front-end: patch embedding, pixel shuffle, projection and input merging.

HoVLE (OpenGVLab/HoVLE) has no separate vision encoder. Its "holistic embedding" module turns an
image into tokens with a single stride-14 convolution plus a learned position table, folds each
2x2 block of patch tokens into one token (pixel shuffle with ``downsample_ratio`` 0.5), projects
it back to the model width (Linear, GELU, Linear), and writes the result over the
``<IMG_CONTEXT>`` positions of the text embeddings. Only then do the module's causal InternLM2
layers run over the whole sequence (those layers live in the generic decoder, not here).

This file implements the parts that come before those layers, with parameter names equal to the
checkpoint keys under ``embedding_model.`` so that a prefix-stripped state dict loads as is:

* ``vision_embeddings.patch_embedding`` (Conv2d), ``vision_embeddings.class_embedding``,
  ``vision_embeddings.position_embedding``;
* ``llm_text_embeddings`` and the optional ``special_text_embeddings`` (ids >= llm_vocab_size);
* ``pixel_shuffle_proj.0`` and ``pixel_shuffle_proj.2``.

The exact behaviour and its sources are documented in ``docs/hovle_format.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FRONT_END_PREFIX",
    "HoVLEVisionConfig",
    "HoVLEVisionFrontEnd",
    "embed_text",
    "extract_front_end_state",
    "merge_image_features",
    "num_image_tokens",
    "pixel_shuffle",
]

FRONT_END_PREFIX = "embedding_model."
"""Checkpoint prefix of the holistic embedding module in a HoVLE state dict."""

_FRONT_END_SUBMODULES = (
    "vision_embeddings.",
    "llm_text_embeddings.",
    "special_text_embeddings.",
    "pixel_shuffle_proj.",
)


def num_image_tokens(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """Number of LLM tokens one image tile becomes.

    Same formula as InternVL/HoVLE's ``num_image_token``:
    ``int((image_size // patch_size) ** 2 * downsample_ratio ** 2)`` (448 px, patch 14, ratio 0.5
    gives 256).

    Args:
        image_size: Tile side in pixels (``force_image_size`` or the embedding ``image_size``).
        patch_size: Patch side in pixels.
        downsample_ratio: Pixel-shuffle ratio (0.5 folds 2x2 patches into one token).

    Returns:
        Tokens per tile.
    """
    return int((image_size // patch_size) ** 2 * (downsample_ratio**2))


@dataclass(frozen=True)
class HoVLEVisionConfig:
    """Sizes the HoVLE front-end needs (a subset of the checkpoint's ``embedding_config``).

    Attributes:
        hidden_size: Width of the embedding module (and of the image tokens).
        llm_vocab_size: Rows of ``llm_text_embeddings``; ids at or above it are special tokens.
        llm_hidden_size: Width of the text embeddings; must equal ``hidden_size`` for merging.
            ``None`` means ``hidden_size``.
        num_special_tokens: Rows of ``special_text_embeddings`` (``len(special_token_maps)``);
            0 means the checkpoint has no such table.
        image_size: Tile side the position table was trained for (its grid is
            ``image_size // patch_size`` on each side).
        patch_size: Convolution kernel and stride.
        num_channels: Input channels (3).
        downsample_ratio: Pixel-shuffle ratio; ``1 / downsample_ratio`` must be an integer.
        pixel_shuffle_loc: ``"pre"`` (shuffle and project before the encoder layers; HoVLE) or
            ``"post"`` (after them; not supported here).
        img_context_token_id: Token id whose embeddings the image features replace.
    """

    hidden_size: int
    llm_vocab_size: int
    llm_hidden_size: int | None = None
    num_special_tokens: int = 0
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    downsample_ratio: float = 0.5
    pixel_shuffle_loc: str = "pre"
    img_context_token_id: int | None = None

    def __post_init__(self) -> None:
        factor = 1.0 / self.downsample_ratio
        if abs(factor - round(factor)) > 1e-6 or round(factor) < 1:
            raise ValueError(
                f"downsample_ratio={self.downsample_ratio}: 1/downsample_ratio must be a positive "
                "integer for the pixel shuffle"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        grid = self.image_size // self.patch_size
        if grid % round(factor):
            raise ValueError(
                f"patch grid {grid}x{grid} is not divisible by 1/downsample_ratio={round(factor)}"
            )
        if self.pixel_shuffle_loc not in ("pre", "post"):
            raise ValueError(
                f"pixel_shuffle_loc={self.pixel_shuffle_loc!r}; expected 'pre' or 'post'"
            )

    @property
    def text_hidden_size(self) -> int:
        """Width of the text embedding tables."""
        return self.hidden_size if self.llm_hidden_size is None else self.llm_hidden_size

    @property
    def shuffle_factor(self) -> int:
        """Side of the patch block folded into one token (2 for ratio 0.5)."""
        return round(1.0 / self.downsample_ratio)

    @property
    def num_image_token(self) -> int:
        """Tokens per tile at ``image_size`` (256 for HoVLE-2.6B)."""
        return num_image_tokens(self.image_size, self.patch_size, self.downsample_ratio)

    @classmethod
    def from_embedding_config(
        cls, embedding_config: Mapping[str, Any], force_image_size: int | None = None
    ) -> HoVLEVisionConfig:
        """Build from a HoVLE ``embedding_config`` dict (``config.json``).

        Args:
            embedding_config: The ``embedding_config`` object of a HoVLE ``config.json``.
            force_image_size: The top-level ``force_image_size``; only checked for consistency
                (the position table is sized by ``embedding_config["image_size"]``).

        Returns:
            The front-end configuration.

        Raises:
            ValueError: If ``use_pixel_shuffle_proj`` is false or a required key is missing.
        """
        missing = [k for k in ("hidden_size", "llm_vocab_size") if k not in embedding_config]
        if missing:
            raise ValueError(f"embedding_config lacks required keys: {missing}")
        if not embedding_config.get("use_pixel_shuffle_proj", True):
            raise ValueError(
                "embedding_config.use_pixel_shuffle_proj is false; HoVLE checkpoints use the "
                "pixel-shuffle projection and only that variant is supported"
            )
        image_size = int(embedding_config.get("image_size", 448))
        if force_image_size is not None and int(force_image_size) != image_size:
            raise ValueError(
                f"force_image_size={force_image_size} differs from embedding_config.image_size="
                f"{image_size}; resized position tables are not supported"
            )
        special = embedding_config.get("special_token_maps") or {}
        return cls(
            hidden_size=int(embedding_config["hidden_size"]),
            llm_vocab_size=int(embedding_config["llm_vocab_size"]),
            llm_hidden_size=embedding_config.get("llm_hidden_size"),
            num_special_tokens=len(special),
            image_size=image_size,
            patch_size=int(embedding_config.get("patch_size", 14)),
            num_channels=int(embedding_config.get("num_channels", 3)),
            downsample_ratio=float(embedding_config.get("downsample_ratio", 0.5)),
            pixel_shuffle_loc=str(embedding_config.get("pixel_shuffle_loc", "pre")),
            img_context_token_id=embedding_config.get("img_context_token_id"),
        )


def pixel_shuffle(x: Tensor, downsample_ratio: float = 0.5, ps_version: str = "v2") -> Tensor:
    """Fold each ``k x k`` block of a square patch grid into one token (``k = 1/ratio``).

    With ``ps_version="v2"`` (the only behaviour of HoVLE's embedding module, and InternVL's
    ``ps_version="v2"``), output token ``(i, j)`` (row-major over the ``g/k x g/k`` grid) is the
    concatenation, in this order, of the input tokens at ``(k*i + dy, k*j + dx)`` for ``dy`` in
    ``0..k-1`` (outer) and ``dx`` in ``0..k-1`` (inner). ``"v1"`` (InternVL's legacy behaviour)
    has the same features but the token grid transposed (column-major order).

    Args:
        x: Patch tokens ``[n, g*g, c]`` in row-major grid order.
        downsample_ratio: ``1/k``.
        ps_version: ``"v2"`` or ``"v1"``.

    Returns:
        Tensor ``[n, (g/k)**2, c*k*k]``.

    Raises:
        ValueError: If the grid is not square or not divisible by ``k``, or the version is
            unknown.
    """
    if ps_version not in ("v1", "v2"):
        raise ValueError(f"ps_version={ps_version!r}; expected 'v1' or 'v2'")
    n, length, c = x.shape
    g = int(round(length**0.5))
    k = round(1.0 / downsample_ratio)
    if g * g != length or g % k:
        raise ValueError(
            f"pixel shuffle needs a square patch grid divisible by {k}; got {length} tokens"
        )
    # Rows of the grid, then pairs of neighbouring columns concatenated: [n, g, g/k, k*c].
    x = x.reshape(n, g, g // k, k * c)
    # Swap to column-block major, then fold k neighbouring rows: [n, g/k, g/k, k*k*c].
    x = x.transpose(1, 2).reshape(n, g // k, g // k, k * k * c)
    if ps_version == "v2":
        # Back to row-block major order.
        x = x.transpose(1, 2)
    return x.reshape(n, (g // k) ** 2, k * k * c)


def embed_text(
    input_ids: Tensor,
    llm_text_embeddings: Tensor,
    special_text_embeddings: Tensor | None = None,
) -> Tensor:
    """Look up HoVLE text embeddings, special ids included.

    Ids below ``llm_vocab_size = llm_text_embeddings.shape[0]`` index ``llm_text_embeddings``;
    ids ``llm_vocab_size + s`` index row ``s`` of ``special_text_embeddings``. HoVLE silently maps
    an out-of-range id to row 0 of a table; here such ids raise instead.

    Args:
        input_ids: Token ids ``[...]`` (any shape, integer dtype).
        llm_text_embeddings: ``[llm_vocab_size, d]``.
        special_text_embeddings: ``[num_special, d]`` or ``None``.

    Returns:
        Embeddings ``[..., d]`` in the tables' dtype.

    Raises:
        ValueError: If an id is negative or beyond both tables.
    """
    vocab = llm_text_embeddings.shape[0]
    extra = 0 if special_text_embeddings is None else special_text_embeddings.shape[0]
    # The range check reads the ids on the host, which a CUDA graph capture forbids; a captured
    # decode step only ever embeds the ids its own head produced.
    capturing = input_ids.is_cuda and torch.cuda.is_current_stream_capturing()
    checkable = input_ids.numel() and not capturing
    if checkable and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab + extra):
        raise ValueError(
            f"token ids must lie in [0, {vocab + extra}) (llm_vocab_size={vocab}, special "
            f"tokens={extra}); got range [{int(input_ids.min())}, {int(input_ids.max())}]"
        )
    special = input_ids >= vocab
    zeros = torch.zeros_like(input_ids)
    out = F.embedding(torch.where(special, zeros, input_ids), llm_text_embeddings)
    if special_text_embeddings is not None and extra:
        rows = torch.where(special, input_ids - vocab, zeros)
        out = torch.where(special.unsqueeze(-1), F.embedding(rows, special_text_embeddings), out)
    return out


def merge_image_features(
    inputs_embeds: Tensor,
    input_ids: Tensor,
    image_features: Tensor,
    img_context_token_id: int,
) -> Tensor:
    """Write image features over the ``<IMG_CONTEXT>`` positions, in order.

    Positions are visited in row-major order of ``input_ids`` (sequence 0 first, left to right),
    and filled with the tokens of ``image_features`` flattened over ``[n, T]``: tile 0's tokens
    first. This is HoVLE's ``replace_img_tokens``. The input is not modified.

    Args:
        inputs_embeds: Text embeddings ``[b, L, d]``.
        input_ids: Token ids ``[b, L]``.
        image_features: Image tokens ``[n, T, d]`` (n tiles over the whole batch).
        img_context_token_id: Id of ``<IMG_CONTEXT>``.

    Returns:
        Embeddings ``[b, L, d]`` (dtype of ``inputs_embeds``).

    Raises:
        ValueError: If shapes disagree or the number of ``<IMG_CONTEXT>`` positions differs from
            ``n * T``.
    """
    if inputs_embeds.dim() != 3 or input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"inputs_embeds {tuple(inputs_embeds.shape)} and input_ids {tuple(input_ids.shape)} "
            "must be [b, L, d] and [b, L]"
        )
    if image_features.dim() != 3 or image_features.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} must be [n, T, "
            f"{inputs_embeds.shape[-1]}]"
        )
    mask = input_ids == img_context_token_id
    n_slots = int(mask.sum())
    n_feats = image_features.shape[0] * image_features.shape[1]
    if n_slots != n_feats:
        raise ValueError(
            f"input_ids hold {n_slots} image-context tokens (id {img_context_token_id}) but "
            f"image_features provide {n_feats} ({image_features.shape[0]} tiles x "
            f"{image_features.shape[1]} tokens); the prompt's <IMG_CONTEXT> count must equal "
            "tiles x num_image_token"
        )
    out = inputs_embeds.clone()
    out[mask] = image_features.reshape(n_feats, -1).to(out.dtype)
    return out


class _VisionEmbeddings(nn.Module):
    """``vision_embeddings``: patch Conv2d, class token (unused by HoVLE) and position table."""

    def __init__(self, cfg: HoVLEVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, d))

    def position_table(self, grid_h: int, grid_w: int) -> Tensor:
        """Patch position embeddings for a ``grid_h x grid_w`` patch grid.

        The class-token row is dropped; the rest is resampled bicubically (align_corners=False,
        in float32) when the grid differs from the trained one, as HoVLE does.

        Returns:
            ``[1, grid_h * grid_w, d]`` in the parameter's dtype.
        """
        table = self.position_embedding[:, 1:, :]
        d = table.shape[-1]
        grid = table.float().reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return grid.reshape(1, d, grid_h * grid_w).transpose(1, 2).to(table.dtype)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Embed tiles ``[n, C, H, W]`` into patch tokens ``[n, (H/p)*(W/p), d]``."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))
        grid_h, grid_w = patches.shape[-2:]
        tokens = patches.flatten(2).transpose(1, 2)
        return tokens + self.position_table(grid_h, grid_w).to(dtype)


class HoVLEVisionFrontEnd(nn.Module):
    """HoVLE's embedding module without its encoder layers.

    Parameter names equal HoVLE's checkpoint keys with the ``embedding_model.`` prefix removed
    (see :func:`extract_front_end_state`).

    Args:
        config: Sizes, or a plain dict accepted by :class:`HoVLEVisionConfig`.
    """

    def __init__(self, config: HoVLEVisionConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = config if isinstance(config, HoVLEVisionConfig) else HoVLEVisionConfig(**config)
        if cfg.pixel_shuffle_loc != "pre":
            raise ValueError(
                "pixel_shuffle_loc='post' (shuffle after the encoder layers) is not supported; "
                "HoVLE checkpoints use 'pre'"
            )
        self.config = cfg
        d = cfg.hidden_size
        k = cfg.shuffle_factor
        self.vision_embeddings = _VisionEmbeddings(cfg)
        self.llm_text_embeddings = nn.Embedding(cfg.llm_vocab_size, cfg.text_hidden_size)
        self.special_text_embeddings: nn.Embedding | None = (
            nn.Embedding(cfg.num_special_tokens, cfg.text_hidden_size)
            if cfg.num_special_tokens
            else None
        )
        self.pixel_shuffle_proj = nn.Sequential(nn.Linear(d * k * k, d), nn.GELU(), nn.Linear(d, d))

    @property
    def num_image_token(self) -> int:
        """Tokens per tile at the configured image size."""
        return self.config.num_image_token

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Turn tiles into LLM-width image tokens ('pre' pixel-shuffle location).

        Patch Conv2d (+bias) plus the (resampled) position table, no class token; pixel shuffle
        (v2 order); ``pixel_shuffle_proj`` (Linear, exact GELU, Linear).

        Args:
            pixel_values: Normalised tiles ``[n, 3, H, W]``; H and W multiples of
                ``patch_size``, the patch grid square and divisible by ``1/downsample_ratio``.

        Returns:
            Image tokens ``[n, num_image_token, hidden]`` (for ``H = W = image_size``) in the
            parameters' dtype.

        Raises:
            ValueError: If ``pixel_values`` is not 4-D or its size does not fit the patch grid.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [n, {self.config.num_channels}, H, W]; got "
                f"{tuple(pixel_values.shape)}"
            )
        p = self.config.patch_size
        if pixel_values.shape[-1] % p or pixel_values.shape[-2] % p:
            raise ValueError(
                f"tile size {tuple(pixel_values.shape[-2:])} is not a multiple of patch {p}"
            )
        tokens = self.vision_embeddings(pixel_values)
        shuffled = pixel_shuffle(tokens, self.config.downsample_ratio, ps_version="v2")
        return self.pixel_shuffle_proj(shuffled)

    def text_embeddings(self, input_ids: Tensor) -> Tensor:
        """Embed ids ``[b, L]`` into ``[b, L, d]`` (special ids included), see :func:`embed_text`."""
        table = self.special_text_embeddings
        special = None if table is None else table.weight
        return embed_text(input_ids, self.llm_text_embeddings.weight, special)

    def embed_inputs(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        img_context_token_id: int | None = None,
    ) -> Tensor:
        """Input of the first encoder layer: text embeddings with image tokens written in.

        Args:
            input_ids: ``[b, L]``.
            pixel_values: ``[n, 3, H, W]`` or ``None`` (text only).
            img_context_token_id: Overrides ``config.img_context_token_id``.

        Returns:
            ``[b, L, d]``.

        Raises:
            ValueError: If images are given without an image-context id, or counts disagree.
        """
        embeds = self.text_embeddings(input_ids)
        if pixel_values is None:
            return embeds
        token_id = img_context_token_id
        if token_id is None:
            token_id = self.config.img_context_token_id
        if token_id is None:
            raise ValueError("img_context_token_id is needed to place image features")
        return merge_image_features(embeds, input_ids, self.image_features(pixel_values), token_id)


def extract_front_end_state(
    state_dict: Mapping[str, Tensor], prefix: str = FRONT_END_PREFIX
) -> dict[str, Tensor]:
    """Select and prefix-strip the front-end tensors of a HoVLE state dict.

    Keys under ``{prefix}encoder.`` (the encoder layers) are left out; any other key under the
    prefix that the front-end does not know raises, so that nothing is silently dropped.

    Args:
        state_dict: Full HoVLE state dict (or just its ``embedding_model.`` part).
        prefix: Prefix of the embedding module.

    Returns:
        A state dict for :class:`HoVLEVisionFrontEnd` (load it with ``strict=True``).

    Raises:
        KeyError: If a key under the prefix is neither an encoder key nor a front-end key.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("encoder."):
            continue
        if name.startswith(_FRONT_END_SUBMODULES):
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"unmapped HoVLE embedding keys: {sorted(unknown)}")
    return out
