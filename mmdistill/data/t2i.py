"""Text-to-image training sequences and task-balanced batches (OmniMamba's decoupled training).

A t2i row is ``<|t2i|> <|sot|> caption <|eot|> <|soi|> codes… <|eoi|>`` (ids as in
:mod:`mmdistill.image_vocab`), right-padded in a batch. With probability ``caption_dropout`` the
caption is dropped (``<|t2i|> <|sot|> <|eot|> <|soi|> …``): the unconditional rows that
classifier-free guidance needs at generation time. Captions longer than ``max_caption_tokens``
keep their first tokens.

:class:`T2IBatches` draws records by source weight in a seeded order (the same
:class:`~mmdistill.data.loader.Mixture` as the distillation data) and can save and restore its
position exactly. :class:`TaskBatches` yields one :class:`TaskBatch` per micro-step holding an
mmu batch, a t2i batch or both, with the per-step sizes the stage asks for (OmniMamba's mmu:t2i
ratio of 3:48 is balance by batch composition: each task's loss is a mean over its own rows and
the two are summed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..image_vocab import ImageVocabSpec
from .loader import Batch, BatchIterator, Mixture


def t2i_row(spec: ImageVocabSpec, caption_ids: list[int], codes: torch.Tensor) -> list[int]:
    """The t2i sequence of a caption (token ids) and its image's codes ``[grid, grid]``."""
    head = [spec.layout_id("<|t2i|>"), spec.layout_id("<|sot|>"), *caption_ids]
    head += [spec.layout_id("<|eot|>"), spec.layout_id("<|soi|>")]
    body = (codes.reshape(-1) + spec.code_offset).tolist()
    return [*head, *body, spec.layout_id("<|eoi|>")]


def t2i_prompt(spec: ImageVocabSpec, caption_ids: list[int]) -> list[int]:
    """The generation prompt: a t2i row up to and including ``<|soi|>``."""
    return t2i_row(spec, caption_ids, torch.zeros(0, dtype=torch.long))[:-1]


@dataclass
class CaptionRecords:
    """One caption source: token ids per caption and codes ``[n, grid, grid]``."""

    caption_ids: list[list[int]]
    codes: torch.Tensor


class T2IBatches:
    """Seeded, resumable t2i batches over caption sources (see module docstring).

    Args:
        sources: the caption sources; ``weights`` their sampling weights.
        spec: the student's image vocabulary.
        seed: seed of the order and of the caption dropout.
        batch_size: rows per process per micro-step.
        caption_dropout: probability of dropping a row's caption.
        pad_id: the id padding holds (its positions have attention mask 0).
        rank, world: this process's slice of the global stream.
    """

    def __init__(
        self,
        sources: list[CaptionRecords],
        weights: list[float],
        spec: ImageVocabSpec,
        seed: tuple[int, ...],
        batch_size: int,
        caption_dropout: float,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.sources, self.spec = sources, spec
        self.mixture = Mixture([len(s.caption_ids) for s in sources], weights, seed)
        self.seed = seed
        self.batch_size, self.caption_dropout, self.pad_id = batch_size, caption_dropout, pad_id
        self.rank, self.world = rank, world
        self.draws = 0

    def __iter__(self):
        return self

    def _row(self) -> list[int]:
        s, index = self.mixture.next()
        source = self.sources[s]
        rng = np.random.default_rng([*self.seed, 11, self.draws])
        self.draws += 1
        drop = self.caption_dropout > 0 and rng.random() < self.caption_dropout
        caption = [] if drop else source.caption_ids[index]
        return t2i_row(self.spec, caption, source.codes[index])

    def __next__(self) -> Batch:
        rows = [self._row() for _ in range(self.batch_size * self.world)]
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        length = max(len(r) for r in mine)
        ids = torch.full((len(mine), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(mine):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return Batch(ids, mask, None)

    def state_dict(self) -> dict:
        return {"mixture": self.mixture.state_dict(), "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.draws = state["draws"]

    def skipped(self) -> dict[str, int]:
        return {}


def caption_records(
    captions: list[str], codes: torch.Tensor, encode: Callable[[str], list[int]], limit: int
) -> CaptionRecords:
    """Tokenise ``captions`` once (``encode`` without special tokens), keeping ``limit`` tokens."""
    return CaptionRecords([encode(c)[:limit] for c in captions], codes)


@dataclass
class TaskBatch:
    """One micro-step of a multi-task stage: an mmu batch, a t2i batch, or both."""

    mmu: Batch | None
    t2i: Batch | None

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in (self.mmu, self.t2i) if b is not None)

    def to(self, device) -> TaskBatch:
        return TaskBatch(*(b.to(device) if b is not None else None for b in (self.mmu, self.t2i)))


class TaskBatches:
    """Pairs an mmu and a t2i batch stream (either may be ``None``) into :class:`TaskBatch`es."""

    def __init__(self, mmu: BatchIterator | None, t2i: T2IBatches | None):
        self.mmu, self.t2i = mmu, t2i

    def __iter__(self):
        return self

    def __next__(self) -> TaskBatch:
        return TaskBatch(
            next(self.mmu) if self.mmu is not None else None,
            next(self.t2i) if self.t2i is not None else None,
        )

    def state_dict(self) -> dict:
        return {
            "mmu": self.mmu.state_dict() if self.mmu is not None else None,
            "t2i": self.t2i.state_dict() if self.t2i is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("mmu", "t2i"):
            stream = getattr(self, name)
            if stream is not None:
                stream.load_state_dict(state[name])

    def skipped(self) -> dict[str, int]:
        return self.mmu.skipped() if self.mmu is not None else {}
