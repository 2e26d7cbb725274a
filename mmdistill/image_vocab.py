"""The image vocabulary a student gains for text-to-image generation (OmniMamba's decoupled
vocabularies), and the token layout of a t2i sequence.

Token ids of a student with an image vocabulary (``V`` = the text vocabulary, ``K`` = the image
tokenizer's codebook)::

    [0, V)            text tokens: the front-end's embeddings, the LM head
    [V, V + 5)        the t2i layout tokens <|t2i|> <|sot|> <|eot|> <|soi|> <|eoi|>
    [V + 5, V + 5 + K) image codes

A t2i sequence is ``<|t2i|> <|sot|> caption <|eot|> <|soi|> codes… <|eoi|>``; the understanding
(mmu) task keeps the student's chat format and never sees these ids.

Two vocabulary modes (``mode``):

* ``decoupled`` (OmniMamba): codes have their own embedding table (``embed_dim`` wide) and an MLP
  projector to the model width, and their own head of ``K`` classes. The text head (``lm_head``)
  and the image head are separate: t2i logits span exactly the codebook, mmu logits exactly the
  text vocabulary.
* ``shared`` (the ablation of OmniMamba's Table 4): codes are extra rows of one joint table and one
  joint head of ``V + K`` classes (the text head's rows, then the code rows), so either task can
  emit either kind of token.

Every code also gets a learned embedding of its position in the image (OmniMamba trains a
position embedding with the t2i modules), so the model knows where in the ``grid x grid`` image
the next code goes. ``positions`` chooses how that position is embedded (:class:`CodePositions`):

* ``raster`` (OmniMamba): one vector per raster index, ``grid²`` of them.
* ``rowcol``: a row vector plus a column vector.
* ``tile:T``: the index of the ``T x T`` tile the code is in plus its index inside the tile,
  so every tile shares one set of within-tile vectors (a drawing learnt in one tile is at
  the same embedding in another).
* ``none``: no position embedding; the recurrence has to count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

LAYOUT_TOKENS = ("<|t2i|>", "<|sot|>", "<|eot|>", "<|soi|>", "<|eoi|>")
VOCAB_MODES = ("decoupled", "shared")


@dataclass
class ImageVocabSpec:
    """The image vocabulary of a student (``config.image_vocab``).

    Attributes:
        text_vocab_size: ``V``, the text vocabulary (the LM head's rows).
        codebook_size: ``K``, codes of the image tokenizer.
        grid: codes per image side (``grid * grid`` codes per image).
        embed_dim: width of the code embeddings before the projector (decoupled mode).
        mode: ``decoupled`` or ``shared`` (module docstring).
        image_tokenizer: the image tokenizer's description (its config and digest), so a student
            can check that codes come from the tokenizer it was trained with.
    """

    text_vocab_size: int
    codebook_size: int
    grid: int
    embed_dim: int = 256
    mode: str = "decoupled"
    positions: str = "raster"
    image_tokenizer: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in VOCAB_MODES:
            raise ValueError(f"image_vocab.mode must be one of {VOCAB_MODES}; got {self.mode!r}")
        position_tables(self.positions, self.grid)
        for key in ("text_vocab_size", "codebook_size", "grid", "embed_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"image_vocab.{key} must be a positive integer")

    @property
    def codes_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def code_offset(self) -> int:
        """The token id of code 0."""
        return self.text_vocab_size + len(LAYOUT_TOKENS)

    def layout_id(self, token: str) -> int:
        """The id of a layout token (one of :data:`LAYOUT_TOKENS`)."""
        return self.text_vocab_size + LAYOUT_TOKENS.index(token)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ImageVocabSpec:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown image_vocab keys: {', '.join(unknown)}")
        return cls(**data)


def position_tables(kind: str, grid: int) -> tuple[int, int]:
    """The two table sizes of position embedding ``kind`` on a ``grid x grid`` image (the second
    is 0 for a single table); a ``ValueError`` for an unknown kind or a tile not dividing ``grid``."""
    if kind == "raster":
        return grid * grid, 0
    if kind == "rowcol":
        return grid, grid
    if kind == "none":
        return 0, 0
    tile = kind.removeprefix("tile:")
    if kind.startswith("tile:") and tile.isdigit() and int(tile) >= 1 and grid % int(tile) == 0:
        return (grid // int(tile)) ** 2, int(tile) ** 2
    raise ValueError(
        f"image_vocab.positions must be raster, rowcol, none or tile:T with T dividing the grid "
        f"({grid}); got {kind!r}"
    )


class CodePositions(nn.Module):
    """Position embeddings of image codes (module docstring): one ``weight`` table holding the
    first index's rows, then the second's; ``forward(raster index) -> [..., width]``."""

    def __init__(self, kind: str, grid: int, width: int):
        super().__init__()
        self.kind, self.grid = kind, grid
        first, second = position_tables(kind, grid)
        self.first = first
        self.tile = int(kind.removeprefix("tile:")) if kind.startswith("tile:") else None
        self.weight = nn.Parameter(torch.empty(first + second, width))
        nn.init.normal_(self.weight)  # as nn.Embedding: the same draws from the global RNG

    def indices(self, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of ``weight`` for raster indices ``where``: the first index, the second (offset)."""
        if self.kind == "raster":
            return where, None
        row, col = where // self.grid, where % self.grid
        if self.kind == "rowcol":
            return row, self.first + col
        tile = self.tile
        per_row = self.grid // tile
        outer = (row // tile) * per_row + col // tile
        return outer, self.first + (row % tile) * tile + col % tile

    def forward(self, where: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return self.weight.new_zeros(*where.shape, self.weight.shape[1])
        first, second = self.indices(where)
        out = nn.functional.embedding(first, self.weight)
        return out if second is None else out + nn.functional.embedding(second, self.weight)


class ImageVocabulary(nn.Module):
    """Embeddings of the layout tokens and image codes, and the image head.

    Parameters: ``layout`` (5 x hidden), ``embed`` (K x embed_dim; K x hidden when shared),
    ``position`` (:class:`CodePositions`, the same width), ``projector`` (decoupled only:
    Linear, GELU, Linear), ``head`` (K x hidden).
    """

    def __init__(self, spec: ImageVocabSpec, hidden_size: int):
        super().__init__()
        self.spec = spec
        width = spec.embed_dim if spec.mode == "decoupled" else hidden_size
        self.layout = nn.Embedding(len(LAYOUT_TOKENS), hidden_size)
        self.embed = nn.Embedding(spec.codebook_size, width)
        self.position = CodePositions(spec.positions, spec.grid, width)
        self.projector = (
            nn.Sequential(
                nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )
            if spec.mode == "decoupled"
            else None
        )
        self.head = nn.Linear(hidden_size, spec.codebook_size, bias=False)

    @torch.no_grad()
    def init_from_text(self, text_embeddings: torch.Tensor, generator=None) -> None:
        """Initialise like the text embeddings: same scale, the layout tokens at their mean."""
        std = float(text_embeddings.float().std())
        self.layout.weight.copy_(text_embeddings.float().mean(0).expand_as(self.layout.weight))
        for table in (self.embed, self.position):
            table.weight.normal_(0.0, std, generator=generator)
        nn.init.normal_(self.head.weight, 0.0, 0.02, generator=generator)

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of layout tokens and codes ``ids`` (ids >= V) ``[...]`` -> ``[..., hidden]``.

        ``positions`` gives each code's raster index in its image (ignored for layout tokens).
        """
        spec = self.spec
        local = ids - spec.text_vocab_size
        is_code = local >= len(LAYOUT_TOKENS)
        codes = (local - len(LAYOUT_TOKENS)).clamp(0, spec.codebook_size - 1)
        where = positions.clamp(0, spec.codes_per_image - 1)
        image = self.embed(codes) + self.position(where)
        if self.projector is not None:
            image = self.projector(image)
        layout = self.layout(local.clamp(0, len(LAYOUT_TOKENS) - 1))
        return torch.where(is_code[..., None], image.to(layout.dtype), layout)
