"""Plain-text training sources and the pieces every source shares.

A *source* is an indexable list of records; ``source.get(i)`` turns record ``i`` into a
:class:`Sample` (token ids, plus image tiles for multimodal records) or ``None`` when the record is
skipped (counted in ``source.skipped``). Records are located by byte offset, so a large file is
scanned once and never held in memory.

Text files:

* ``.txt``: one document per non-empty line;
* ``.jsonl``: ``{"text": "..."}`` (tokenised with the teacher's tokenizer) or
  ``{"input_ids": [...]}`` (used as given, for teachers without a tokenizer).

A text document is ``BOS + tokens + EOS`` (BOS as the tokenizer adds it).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, DataError
from ..tokenizer import load_tokenizer


@dataclass
class Sample:
    """One rendered record.

    Attributes:
        input_ids: token ids.
        pixel_values: ``[tiles, 3, s, s]`` image tiles in the order of their image-token spans,
            or ``None``.
        splittable: may be cut across packed sequences (text); multimodal samples never are.
    """

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None
    splittable: bool = True


@dataclass
class DataContext:
    """What rendering needs from the teacher, loaded lazily.

    Attributes:
        config: the teacher's :class:`~mmdistill.model.LMConfig`.
        tokenizer_dir: directory of the teacher's tokenizer files.
        system_message: system message for conversations (``None``: the template's default).
        on_bad_image: ``"skip"`` or ``"fail"``.
        max_skipped_fraction: with ``"skip"``, the largest fraction of a file's records that
            may be skipped (see :class:`~mmdistill.recipe.DataSpec`).
    """

    config: object
    tokenizer_dir: str | None
    system_message: str | None = None
    on_bad_image: str = "skip"
    max_skipped_fraction: float = 0.1
    _tokenizer: object = field(default=None, repr=False)

    @property
    def tokenizer(self):
        """The teacher's :class:`~mmdistill.tokenizer.Tokenizer` (raises DataError if none)."""
        if self._tokenizer is None:
            if not self.tokenizer_dir:
                raise DataError("the teacher has no tokenizer directory; use pre-tokenised data")
            try:
                self._tokenizer = load_tokenizer(self.tokenizer_dir)
            except CheckpointError as exc:
                raise DataError(
                    f"{exc}; text data needs the teacher's tokenizer (or give JSONL records of "
                    '{"input_ids": [...]})'
                ) from exc
        return self._tokenizer

    @property
    def eos_token_id(self) -> int | None:
        eos = getattr(self.config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return eos

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.config, "pad_token_id", None)
        if pad is None:
            pad = self.eos_token_id
        return 0 if pad is None else int(pad)


def json_record(line: str, where: str) -> dict:
    """One JSONL line parsed as a JSON object; DataError naming ``where`` otherwise."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise DataError(f"{where} is not a JSON object")
    return value


class LineFile:
    """Byte offsets of the non-empty lines of a file, for random access."""

    def __init__(self, path: str | Path, max_records: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data file not found: {self.path}")
        self.offsets: list[int] = []
        position = 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    self.offsets.append(position)
                    if max_records is not None and len(self.offsets) >= max_records:
                        break
                position += len(line)
        if not self.offsets:
            raise DataError(f"{self.path} has no records")

    def __len__(self) -> int:
        return len(self.offsets)

    def line(self, index: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            raw = f.readline()
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path}: record {index} is not UTF-8: {exc}") from exc

    def record(self, index: int) -> dict:
        """Record ``index`` parsed as a JSON object."""
        return json_record(self.line(index), f"{self.path}: record {index}")


class TextSource:
    """Documents of a ``.txt`` or ``{"text"|"input_ids"}`` JSONL file.

    Args:
        path: the file.
        ctx: rendering context (tokenizer).
        max_samples: use only the first N records.
    """

    def __init__(self, path: str | Path, ctx: DataContext, max_samples: int | None = None):
        self.name = str(path)
        self.ctx = ctx
        self.lines = LineFile(path, max_samples)
        self.jsonl = Path(path).suffix == ".jsonl"
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.lines)

    def get(self, index: int) -> Sample | None:
        if not self.jsonl:
            return Sample(self._encode(self.lines.line(index)))
        record = self.lines.record(index)
        if "input_ids" in record:
            ids = record["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids) or not ids:
                raise DataError(
                    f"{self.name}: record {index}: input_ids must be a non-empty list of ints"
                )
            vocab = int(self.ctx.config.vocab_size)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise DataError(
                    f"{self.name}: record {index}: token id {bad[0]} is outside the teacher's "
                    f"vocabulary (0..{vocab - 1})"
                )
            return Sample(list(ids))
        if not isinstance(record.get("text"), str):
            raise DataError(
                f'{self.name}: record {index} has neither "text" (a string) nor "input_ids"'
            )
        return Sample(self._encode(record["text"]))

    def _encode(self, text: str) -> list[int]:
        ids = self.ctx.tokenizer.encode(text, add_special_tokens=True)
        eos = self.ctx.eos_token_id
        return ids + ([eos] if eos is not None else [])
