"""Batches for distillation: a weighted mixture of sources, packed into fixed-length sequences,
in an order fixed by the seed, with a position that can be saved and restored exactly.

Order. Each draw picks a source with probability proportional to its weight (one numpy
``Generator`` seeded from ``data.seed``), then that source's next record in a permutation that
depends only on ``(seed, source, epoch)``; a source that runs out starts a new epoch with a new
permutation.

Packing. Samples are concatenated into sequences of ``seq_len`` tokens. A text sample that does
not fit continues at the start of the next sequence; a multimodal sample is never split: it
starts the next sequence and the current one is padded (``attention_mask`` 0). Samples longer than
a sequence are cut (text) or skipped and counted (multimodal). Without packing, each sequence holds
one sample, padded. Packed documents are not masked from each other.

Processes. Every process walks the same global stream of sequences; an optimiser micro-step
consumes ``processes * batch_size`` of them and process ``r`` keeps the ``r``-th slice. So one
process with ``grad_accum = k`` sees exactly the sequences of ``k`` processes with
``grad_accum = 1``.

Position. :meth:`BatchIterator.state_dict` is a small JSON-able dict (the sampler's RNG state,
each source's epoch and cursor, and the partly consumed sample carried into the next sequence);
:meth:`BatchIterator.load_state_dict` resumes at exactly the next batch.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..files import cache_root
from .conversations import ConversationSource
from .synthetic import build_demo_dataset
from .text import DataContext, LineFile, Sample, TextSource


@dataclass
class Batch:
    """One process's micro-batch.

    Attributes:
        input_ids: ``[b, seq_len]`` token ids (padding holds the pad id).
        attention_mask: ``[b, seq_len]`` 1 for real tokens, 0 for padding.
        pixel_values: ``[tiles, 3, s, s]`` image tiles of all rows in row order, or ``None``.
        tokens: number of real tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device, dtype: torch.dtype | None = None) -> Batch:
        pixels = self.pixel_values
        if pixels is not None:
            pixels = pixels.to(device=device, dtype=dtype or pixels.dtype)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), pixels)


def shapes_dataset(spec, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Build (once) the ``builtin:shapes`` data set described by ``spec`` and return its paths.

    Args:
        spec: a :class:`~mmdistill.recipe.ShapesSpec`.
        cache_dir: parent directory (default: ``<mmdistill cache>/data``).
    """
    params = spec.model_dump()
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "data"
    return build_demo_dataset(
        root / f"shapes-{digest}",
        n_train=spec.n_train,
        n_eval=spec.n_eval,
        seed=spec.seed,
        image_size=spec.image_size,
        max_shapes=spec.max_shapes,
        text_lines=spec.text_lines,
    )


def resolve_source_path(source: str, shapes: dict[str, Path] | None) -> Path:
    """File behind a recipe source (``builtin:shapes[/eval|/text]`` or a path)."""
    if not source.startswith("builtin:"):
        return Path(source)
    if shapes is None:
        raise DataError(f"{source} needs the shapes data set to be built first")
    part = {"builtin:shapes": "train", "builtin:shapes/eval": "eval", "builtin:shapes/text": "text"}
    return shapes[part[source]]


def open_source(path: Path, ctx: DataContext, image_root=None, max_samples=None):
    """A :class:`TextSource` or :class:`ConversationSource`, chosen by the file's records."""
    if path.suffix == ".txt":
        return TextSource(path, ctx, max_samples)
    first = LineFile(path, 1).record(0)
    if "conversations" in first:
        return ConversationSource(path, ctx, image_root, max_samples)
    if "text" in first or "input_ids" in first:
        if image_root is not None:
            raise DataError(f"{path}: image_root is set but the file holds text records")
        return TextSource(path, ctx, max_samples)
    raise DataError(
        f'{path}: records need "conversations", "text" or "input_ids"; the first has '
        f"{sorted(first)}"
    )


class Mixture:
    """Deterministic stream of ``(source, record)`` references drawn by weight.

    Args:
        sizes: records per source.
        weights: relative sampling weights.
        seed: seed of the order: an int or a tuple of ints (e.g. ``(data.seed, stage)``).
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int | tuple[int, ...]):
        self.sizes = sizes
        total = float(sum(weights))
        self.probs = np.array([w / total for w in weights])
        self.seed = (seed,) if isinstance(seed, int) else tuple(int(x) for x in seed)
        entropy = [*self.seed, 7]
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
        self.epoch = [0] * len(sizes)
        self.cursor = [0] * len(sizes)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _perm(self, s: int) -> np.ndarray:
        cached = self._perms.get(s)
        if cached is None or cached[0] != self.epoch[s]:
            rng = np.random.default_rng(np.random.SeedSequence([*self.seed, s, self.epoch[s]]))
            cached = (self.epoch[s], rng.permutation(self.sizes[s]))
            self._perms[s] = cached
        return cached[1]

    def next(self) -> tuple[int, int]:
        s = int(self.rng.choice(len(self.sizes), p=self.probs)) if len(self.sizes) > 1 else 0
        index = int(self._perm(s)[self.cursor[s]])
        self.cursor[s] += 1
        if self.cursor[s] == self.sizes[s]:
            self.epoch[s] += 1
            self.cursor[s] = 0
        return s, index

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "epoch": list(self.epoch),
            "cursor": list(self.cursor),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epoch = list(state["epoch"])
        self.cursor = list(state["cursor"])


class SequenceStream:
    """Fixed-length token sequences (with their image tiles) from a :class:`Mixture`.

    Args:
        sources: objects with ``__len__``, ``get(i) -> Sample | None`` and ``skipped``.
        weights: mixture weights.
        seq_len: tokens per sequence.
        packing: pack several samples per sequence.
        seed: seed of the order (see :class:`Mixture`).
        pad_token_id: id written into padding.
    """

    def __init__(
        self,
        sources,
        weights,
        seq_len: int,
        packing: bool,
        seed: int | tuple[int, ...],
        pad_token_id: int,
    ):
        self.sources = sources
        self.seq_len = seq_len
        self.packing = packing
        self.pad = pad_token_id
        self.mixture = Mixture([len(s) for s in sources], list(weights), seed)
        self.carry: tuple[int, int, int] | None = None  # (source, record, token offset)
        self.too_long: Counter[str] = Counter()
        self.samples = 0

    def _sample(self, s: int, index: int) -> Sample | None:
        sample = self.sources[s].get(index)
        if sample is None:
            return None
        if len(sample.input_ids) > self.seq_len and not sample.splittable:
            self.too_long[self.sources[s].name] += 1
            return None
        if len(sample.input_ids) > self.seq_len and not self.packing:
            sample.input_ids = sample.input_ids[: self.seq_len]
        return sample

    def next(self) -> tuple[list[int], list[torch.Tensor]]:
        """The next sequence: ``seq_len`` ids (real ones first) and its image tiles in order.

        Padding is whatever follows the real tokens; the caller masks it.
        """
        ids: list[int] = []
        pixels: list[torch.Tensor] = []
        misses = 0
        while len(ids) < self.seq_len:
            if self.carry is not None:
                s, index, offset = self.carry
                self.carry = None
            else:
                s, index = self.mixture.next()
                offset = 0
            sample = self._sample(s, index)
            if sample is None:
                misses += 1
                if misses > 1000 and not ids:
                    bad = sum(sum(src.skipped.values()) for src in self.sources)
                    raise DataError(
                        f"1000 records in a row were skipped ({sum(self.too_long.values())} so "
                        f"far too long for data.seq_len {self.seq_len} with their images, {bad} "
                        "with bad images); raise data.seq_len or check the data"
                    )
                continue
            misses = 0
            rest = sample.input_ids[offset:]
            room = self.seq_len - len(ids)
            if len(rest) <= room:
                ids.extend(rest)
                if sample.pixel_values is not None:
                    pixels.append(sample.pixel_values)
            elif sample.splittable and self.packing:
                ids.extend(rest[:room])
                self.carry = (s, index, offset + room)
            else:  # a multimodal sample that does not fit: it starts the next sequence
                self.carry = (s, index, 0)
                break
            if offset == 0:
                self.samples += 1
            if not self.packing:
                break
        return ids, pixels

    def state_dict(self) -> dict:
        return {
            "mixture": self.mixture.state_dict(),
            "carry": list(self.carry) if self.carry is not None else None,
            "samples": self.samples,
            "too_long": dict(self.too_long),
            "skipped": [dict(s.skipped) for s in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.carry = tuple(state["carry"]) if state["carry"] is not None else None
        self.samples = int(state["samples"])
        self.too_long = Counter(state["too_long"])
        for source, skipped in zip(self.sources, state["skipped"], strict=True):
            source.skipped = Counter(skipped)


class BatchIterator:
    """This process's micro-batches from a global :class:`SequenceStream`.

    Args:
        stream: the global sequence stream (identical in every process).
        batch_size: sequences per process per micro-step.
        rank, world: this process and the number of processes.
    """

    def __init__(self, stream: SequenceStream, batch_size: int, rank: int = 0, world: int = 1):
        self.stream = stream
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        rows = []
        for k in range(self.world * self.batch_size):
            ids, pixels = self.stream.next()
            if k // self.batch_size == self.rank:
                rows.append((ids, pixels))
        self.batches += 1
        return collate(rows, self.stream.seq_len, self.stream.pad)

    def state_dict(self) -> dict:
        """JSON-able position (taken between batches)."""
        return {"stream": self.stream.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.batches = int(state["batches"])

    def skipped(self) -> dict[str, int]:
        """Records skipped so far, by reason and source."""
        out: dict[str, int] = {}
        for source in self.stream.sources:
            for reason, n in source.skipped.items():
                out[f"{reason}:{source.name}"] = n
        for name, n in self.stream.too_long.items():
            out[f"too_long:{name}"] = n
        return out


def collate(rows: list[tuple[list[int], list[torch.Tensor]]], seq_len: int, pad: int) -> Batch:
    """Stack sequences into a :class:`Batch` (right padding to ``seq_len``)."""
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    tiles = []
    for i, (row, pixels) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
        tiles.extend(pixels)
    return Batch(ids, mask, torch.cat(tiles) if tiles else None)


def build_sources(specs, ctx: DataContext, shapes: dict[str, Path] | None) -> list:
    """Open every recipe :class:`~mmdistill.recipe.DataSource`."""
    return [
        open_source(
            resolve_source_path(spec.source, shapes),
            ctx,
            spec.image_root,
            spec.max_samples,
        )
        for spec in specs
    ]


def make_iterator(
    specs,
    ctx: DataContext,
    shapes: dict[str, Path] | None,
    seq_len: int,
    packing: bool,
    seed: int | tuple[int, ...],
    batch_size: int,
    rank: int = 0,
    world: int = 1,
) -> BatchIterator:
    """A :class:`BatchIterator` over recipe data sources ``specs``."""
    sources = build_sources(specs, ctx, shapes)
    stream = SequenceStream(
        sources, [s.weight for s in specs], seq_len, packing, seed, ctx.pad_token_id
    )
    return BatchIterator(stream, batch_size, rank, world)
