"""Students against one teacher over data files: scoring, answers and the report dicts.

:func:`evaluate_many` prepares every file once (:mod:`.prepare`), scores teacher and students on
the same sequences (:mod:`.scoring`, one teacher forward per batch for all students), asks the
questions of each file greedily (:func:`mmdistill.answers.greedy_answers`) and returns one report
per student; :func:`evaluate` is the one-student form.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from ..answers import Question, greedy_answers
from ..chat_format import ChatFormat, chat_format_for
from ..data.synthetic import answer_accuracy
from ..errors import DataError, MmdistillError
from ..metrics import TokenSums
from ..model import DecoderLM
from ..tokenizer import Tokenizer
from .models import describe, load_model, tokenizer_for
from .prepare import EvalFile, prepare_file
from .scoring import score_sequences

Answerer = Callable[[DecoderLM, Sequence[Question]], list[str]]


def _metrics(teacher: TokenSums, student: TokenSums) -> dict[str, Any]:
    n = student.tokens
    if n == 0:
        keys = ("teacher_nll", "student_nll", "teacher_ppl", "student_ppl", "kl", "top1_agreement")
        return {"tokens": 0, **dict.fromkeys(keys)}
    return {
        "tokens": n,
        "teacher_nll": teacher.nll / n,
        "student_nll": student.nll / n,
        "teacher_ppl": math.exp(teacher.nll / n),
        "student_ppl": math.exp(student.nll / n),
        "kl": student.kl / n,
        "top1_agreement": student.agree / n,
    }


def _accuracy(
    refs: Sequence[str], teacher: Sequence[str], student: Sequence[str]
) -> dict[str, Any] | None:
    if not refs:
        return None
    return {
        "teacher": answer_accuracy(teacher, refs),
        "student": answer_accuracy(student, refs),
        "questions": len(refs),
    }


def _progress(enabled: bool, total: int) -> tuple[AbstractContextManager, Callable[[int], None]]:
    """A rich progress bar on stderr (or a no-op) and its ``advance(n)`` callback."""
    if not enabled or total == 0:
        return nullcontext(), lambda n: None
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task("evaluating", total=total)
    return progress, lambda n: progress.advance(task, n)


@dataclass
class _Totals:
    """What is summed over files: token sums and, in order, references and answers."""

    teacher: TokenSums = field(default_factory=TokenSums)
    students: dict[str, TokenSums] = field(default_factory=dict)
    refs: list[str] = field(default_factory=list)
    teacher_answers: list[str] = field(default_factory=list)
    student_answers: dict[str, list[str]] = field(default_factory=dict)


def _file_entries(
    data: EvalFile,
    sums: tuple[TokenSums, dict[str, TokenSums]],
    questions: Sequence[Question],
    answers: tuple[list[str], dict[str, list[str]]],
    examples: int,
) -> dict[str, dict[str, Any]]:
    """Each student's report entry for one file."""
    refs = [q.reference for q in questions]
    entries = {}
    for name, student_sums in sums[1].items():
        student_answers = answers[1][name]
        entry = {
            "path": str(data.path),
            "kind": data.kind,
            "documents": data.documents,
            **_metrics(sums[0], student_sums),
            "answer_accuracy": _accuracy(refs, answers[0], student_answers),
        }
        if questions and examples:
            entry["examples"] = [
                {
                    "question": q.question,
                    "reference": q.reference,
                    "teacher": answers[0][i],
                    "student": student_answers[i],
                }
                for i, q in enumerate(questions[:examples])
            ]
        entries[name] = entry
    return entries


def _run_file(
    data: EvalFile,
    teacher: DecoderLM,
    students: Mapping[str, DecoderLM],
    score: Callable[[EvalFile], tuple[TokenSums, dict[str, TokenSums]]],
    answer: Answerer,
    totals: _Totals,
    examples: int,
) -> dict[str, dict[str, Any]]:
    """Score and ask one file, add it to ``totals``; each student's entry for the file."""
    sums = score(data)
    teacher_answers = answer(teacher, data.questions)
    student_answers = {name: answer(model, data.questions) for name, model in students.items()}
    totals.teacher.add(sums[0])
    for name in students:
        totals.students.setdefault(name, TokenSums()).add(sums[1][name])
        totals.student_answers.setdefault(name, []).extend(student_answers[name])
    totals.refs += [q.reference for q in data.questions]
    totals.teacher_answers += teacher_answers
    return _file_entries(data, sums, data.questions, (teacher_answers, student_answers), examples)


def _answerer(
    tokenizer: Tokenizer,
    fmt: ChatFormat,
    pad_id: int,
    batch_size: int,
    max_new_tokens: int,
    advance: Callable[[int], None],
    decode: str,
) -> Answerer:
    """``answer(model, questions)``: greedy answers, stopping where ``fmt`` ends a turn."""

    def answer(model: DecoderLM, questions: Sequence[Question]) -> list[str]:
        return greedy_answers(
            model,
            tokenizer,
            questions,
            fmt.stop_ids,
            pad_id=pad_id,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            stop_text=fmt.stop_text,
            advance=advance,
            decode=decode,
        )

    return answer


def _check_vocabularies(students: Mapping[str, DecoderLM], teacher: DecoderLM) -> None:
    for name, student in students.items():
        if student.config.vocab_size != teacher.config.vocab_size:
            raise MmdistillError(
                f"student {name!r} has vocabulary {student.config.vocab_size}, the teacher "
                f"{teacher.config.vocab_size}: they must share a tokenizer"
            )


def evaluate_many(
    students: Mapping[str, DecoderLM],
    teacher: DecoderLM,
    files: Sequence[str | Path],
    *,
    tokenizer: Tokenizer | None = None,
    max_tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int = 1,
    answers: bool = True,
    max_questions: int | None = None,
    max_new_tokens: int = 16,
    use_template: bool = True,
    progress: bool = False,
    examples: int = 3,
    decode: str = "auto",
) -> dict[str, dict[str, Any]]:
    """Evaluate several students against one teacher on the same data (one teacher pass).

    Args:
        students: name -> student (any :class:`DecoderLM`: a teacher itself works too).
        teacher: the reference model; its config decides templates and image preprocessing.
        files: ``.txt`` / ``.jsonl`` data files.
        tokenizer: defaults to the one saved with the teacher.
        max_tokens: cap on scored tokens per file.
        seq_len: window length for documents.
        batch_size: sequences per forward (and prompts per generation batch).
        answers: generate answers to QA turns for answer accuracy.
        max_questions: cap on questions per file.
        max_new_tokens: answer length limit.
        use_template: False renders conversations as plain text.
        progress: show a progress bar on stderr.
        examples: question/answer examples to keep per file.
        decode: the answers' decode path (:func:`mmdistill.generation.generate`: ``auto``
            replays a captured step on CUDA).

    Returns:
        ``{name: result}`` with each result as :func:`evaluate` returns it.
    """
    if not files:
        raise DataError("no data files to evaluate")
    tokenizer = tokenizer if tokenizer is not None else tokenizer_for(teacher)
    _check_vocabularies(students, teacher)
    start_time = time.perf_counter()
    prepared = [
        prepare_file(f, teacher, tokenizer, seq_len, max_tokens, max_questions, use_template)
        for f in files
    ]
    if not answers:
        for data in prepared:
            data.questions = []
    fmt = chat_format_for(teacher.config, tokenizer, use_template)
    pad_id = tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (fmt.stop_ids or [0])[0]
    n_questions = sum(len(d.questions) for d in prepared)
    bar, advance = _progress(
        progress, sum(len(d.sequences) for d in prepared) + n_questions * (1 + len(students))
    )

    def score(data: EvalFile) -> tuple[TokenSums, dict[str, TokenSums]]:
        return score_sequences(teacher, students, data.sequences, batch_size, pad_id, advance)

    answer = _answerer(tokenizer, fmt, pad_id, batch_size, max_new_tokens, advance, decode)
    totals = _Totals()
    with bar:
        per_file = [
            _run_file(data, teacher, students, score, answer, totals, examples) for data in prepared
        ]
    seconds = round(time.perf_counter() - start_time, 3)
    return {
        name: {
            "teacher_layout": describe(teacher),
            "student_layout": describe(student),
            **_metrics(totals.teacher, totals.students[name]),
            "answer_accuracy": _accuracy(
                totals.refs, totals.teacher_answers, totals.student_answers[name]
            ),
            "seq_len": seq_len,
            "max_tokens": max_tokens,
            "seconds": seconds,
            "files": [entries[name] for entries in per_file],
        }
        for name, student in students.items()
    }


def evaluate(
    student: DecoderLM | str | Path,
    teacher: DecoderLM | str | Path,
    files: Sequence[str | Path],
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a student against its teacher.

    Args:
        student: a model or a source for :func:`~mmdistill.evaluation.models.load_model`.
        teacher: a model or a source for :func:`~mmdistill.evaluation.models.load_model`.
        files: ``.txt`` / ``.jsonl`` data files.
        **kwargs: options of :func:`evaluate_many`.

    Returns:
        ``teacher_layout``, ``student_layout`` (layer counts), ``tokens``, ``teacher_nll``,
        ``student_nll``, ``teacher_ppl``, ``student_ppl``, ``kl``, ``top1_agreement``,
        ``answer_accuracy`` (``{"teacher", "student", "questions"}`` or ``None``), ``seq_len``,
        ``max_tokens``, ``seconds`` and ``files`` (the same metrics per file, with ``path``,
        ``kind``, ``documents`` and a few answer ``examples``).
    """
    if not isinstance(teacher, DecoderLM):
        teacher = load_model(teacher)
    if not isinstance(student, DecoderLM):
        student = load_model(student)
    return evaluate_many({"student": student}, teacher, files, **kwargs)["student"]
