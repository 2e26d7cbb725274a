"""Text documents cut into scored windows.

A document is ``BOS + tokens + EOS`` (as the tokenizer's ``encode`` adds them). It is cut into
windows of ``seq_len`` tokens; consecutive windows share one token, so every token but the first
is predicted exactly once, from the context inside its window.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..tokenizer import Tokenizer

_TEXT_BLOCK_CHARS = 1 << 16  # .txt files are tokenised in blocks of whole lines this long


@dataclass
class ScoredSequence:
    """One model input.

    Attributes:
        ids: token ids, length ``l``.
        targets: length ``l``; ``targets[j]`` is True when token ``j`` (``j >= 1``) is scored,
            i.e. predicted from the logits at ``j - 1``.
        images: image files whose tiles fill the sequence's image tokens, in order.
    """

    ids: list[int]
    targets: list[bool]
    images: list[Path] = field(default_factory=list)

    @property
    def scored(self) -> int:
        return sum(self.targets)


def special_affixes(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Tokens ``encode`` adds before and after a text (e.g. ``[bos]``, ``[]``)."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def windows(ids: list[int], seq_len: int, quota: int | None) -> list[ScoredSequence]:
    """Cut a document into windows of ``seq_len`` sharing one token; at most ``quota`` targets."""
    out = []
    start = 0
    while start < len(ids) - 1 and (quota is None or quota > 0):
        window = ids[start : start + seq_len]
        n = len(window) - 1 if quota is None else min(len(window) - 1, quota)
        window = window[: n + 1]
        out.append(ScoredSequence(window, [False] + [True] * n))
        quota = None if quota is None else quota - n
        start += seq_len - 1
    return out


def text_blocks(path: Path) -> Iterator[str]:
    """A text file in blocks of whole lines (so a token cap needs only part of a big file)."""
    block: list[str] = []
    size = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            block.append(line)
            size += len(line)
            if size >= _TEXT_BLOCK_CHARS:
                yield "".join(block)
                block, size = [], 0
    if block:
        yield "".join(block)


def document_ids(blocks: Iterable[str], tokenizer: Tokenizer, need: int | None) -> list[int]:
    """Encode a document given in blocks; stop early once ``need`` tokens are there."""
    prefix, suffix = special_affixes(tokenizer)
    ids = list(prefix)
    for block in blocks:
        ids.extend(tokenizer.encode(block, add_special_tokens=False))
        if need is not None and len(ids) >= need:
            return ids
    return ids + suffix
