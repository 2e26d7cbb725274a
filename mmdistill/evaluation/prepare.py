"""Evaluation data files read and tokenised: what is scored, and the questions to ask.

``.txt`` files are one document each (:mod:`.documents`). ``.jsonl`` files hold one record per
line: ``{"text": ...}`` is a document; ``{"conversations": [...]}`` a conversation
(:mod:`.conversations`). ``max_tokens`` caps the scored tokens of a file (the last window or
record is cut short); ``max_questions`` the questions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..answers import Question
from ..chat_format import ChatFormat, chat_format_for
from ..data.text import json_record
from ..errors import DataError
from ..model import DecoderLM
from ..tokenizer import Tokenizer
from .conversations import conversation
from .documents import ScoredSequence, document_ids, text_blocks, windows


@dataclass
class EvalFile:
    """One data file, tokenised.

    Attributes:
        path: the file.
        kind: ``"text"``, ``"conversations"`` or ``"mixed"``.
        documents: documents or records read.
        sequences: what is scored.
        questions: questions for answer accuracy.
    """

    path: Path
    kind: str
    documents: int
    sequences: list[ScoredSequence]
    questions: list[Question]

    @property
    def tokens(self) -> int:
        return sum(s.scored for s in self.sequences)


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                where = f"{path}:{n}"
                yield where, json_record(line, where)


def _capped(seq: ScoredSequence, quota: int | None) -> ScoredSequence:
    """``seq`` with only its first ``quota`` targets kept."""
    if quota is not None:
        kept = set([j for j, t in enumerate(seq.targets) if t][:quota])
        seq.targets = [j in kept for j in range(len(seq.ids))]
    return seq


def _read_records(
    path: Path, fmt: ChatFormat, seq_len: int, max_tokens: int | None
) -> tuple[list[ScoredSequence], list[Question], set[str], int]:
    """Sequences, questions, record kinds and records read of a JSONL file, up to the token cap."""
    sequences: list[ScoredSequence] = []
    questions: list[Question] = []
    kinds = set()
    documents = 0
    quota = max_tokens
    for where, record in _read_jsonl(path):
        if quota is not None and quota <= 0:
            break
        documents += 1
        if "conversations" in record:
            kinds.add("conversations")
            seq, asked = conversation(record, path.parent, where, fmt)
            parts = [_capped(seq, quota)]
            questions.extend(asked)
        elif isinstance(record.get("text"), str):
            kinds.add("text")
            parts = windows(document_ids([record["text"]], fmt.tokenizer, None), seq_len, quota)
        else:
            raise DataError(f"{where}: a record needs 'text' or 'conversations'")
        parts = [s for s in parts if s.scored]
        sequences.extend(parts)
        quota = None if quota is None else quota - sum(s.scored for s in parts)
    return sequences, questions, kinds, documents


def prepare_file(
    path: str | Path,
    model: DecoderLM,
    tokenizer: Tokenizer,
    seq_len: int = 512,
    max_tokens: int | None = None,
    max_questions: int | None = None,
    use_template: bool = True,
) -> EvalFile:
    """Read and tokenise one data file.

    Args:
        path: a ``.txt`` or ``.jsonl`` file.
        model: the teacher (its config decides templates and image preprocessing).
        tokenizer: the tokenizer shared by teacher and students.
        seq_len: window length for documents.
        max_tokens: cap on scored tokens (``None``: the whole file).
        max_questions: cap on questions for answer accuracy (``None``: all read).
        use_template: False renders conversations as plain ``question\\nanswer\\n`` text.

    Returns:
        An :class:`EvalFile`.

    Raises:
        DataError: missing file, unknown extension, malformed records, missing images.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        need = None if max_tokens is None else max_tokens + 1
        ids = document_ids(text_blocks(path), tokenizer, need)
        return EvalFile(path, "text", 1, windows(ids, seq_len, max_tokens), [])
    if suffix != ".jsonl":
        raise DataError(f"{path}: unsupported data file; use .txt or .jsonl")
    fmt = chat_format_for(model.config, tokenizer, use_template)
    sequences, questions, kinds, documents = _read_records(path, fmt, seq_len, max_tokens)
    if max_questions is not None:
        questions = questions[:max_questions]
    kind = "mixed" if len(kinds) > 1 else (kinds.pop() if kinds else "text")
    return EvalFile(path, kind, documents, sequences, questions)
