"""``mmdistill layout``: every layer's score for ``--attention-layers auto:K`` on data files.

The same measurement a recipe's ``auto:K`` makes (:mod:`mmdistill.layer_scores`), on
``.txt`` / ``.jsonl`` files read as ``mmdistill eval`` reads them (KL at the positions that
predict scored tokens). The linear student is ``student_dir`` if given: use one trained
through the layer-wise stages (e.g. the stage-2 checkpoint of a ``none`` run), which is what
a recipe scores. Otherwise it is the linear student seeded from the teacher without
training, a cheaper and rougher ranking.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..attention_layers import auto_budget
from ..errors import DataError
from ..layer_scores import SEARCHES, score_layers, search_layers, with_attention
from ..model import DecoderLM
from ..seeding import seed
from .prepare import prepare_file
from .scoring import batch_inputs


def _batches(teacher: DecoderLM, sequences, batch_size: int, pad_id: int):
    for start in range(0, len(sequences), batch_size):
        ids, targets, pixel_values = batch_inputs(
            sequences[start : start + batch_size], pad_id, teacher.config
        )
        scored = torch.zeros_like(targets)
        scored[:, :-1] = targets[:, 1:]  # the position that predicts each scored token
        yield ids, pixel_values, scored


def file_batches(
    teacher: DecoderLM,
    files: Sequence[str | Path],
    tokenizer,
    max_tokens: int | None = 8192,
    seq_len: int = 512,
    batch_size: int = 4,
) -> list:
    """Calibration batches (:data:`~mmdistill.layer_scores.Batch`) from ``files``.

    Raises:
        DataError: no files, or nothing to score in them.
    """
    if not files:
        raise DataError("no data files to score the layers on")
    sequences = []
    for path in files:
        sequences += prepare_file(path, teacher, tokenizer, seq_len, max_tokens).sequences
    if not sequences:
        raise DataError(f"nothing to score in {', '.join(map(str, files))}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return list(_batches(teacher, sequences, batch_size, pad))


def measure_layout(
    teacher: DecoderLM,
    files: Sequence[str | Path],
    tokenizer,
    student: DecoderLM | None = None,
    budget: int | None = None,
    max_tokens: int | None = 8192,
    seq_len: int = 512,
    batch_size: int = 4,
    search: str = "top",
) -> dict:
    """``{"scores", "chosen", "budget", "search", "student", "tokens", "seconds"}`` for
    ``mmdistill layout``, on ``student`` or else the seeded linear student. ``search``:
    ``top`` scores once; ``greedy`` (needs ``budget``) runs
    :func:`~mmdistill.layer_scores.search_layers` and adds ``order`` and ``kl_after``."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}; got {search!r}")
    if search == "greedy" and not budget:
        raise ValueError("a greedy search needs a budget")
    start = time.perf_counter()
    linear = student if student is not None else seed(teacher, attention_layers="none").float()
    batches = file_batches(teacher, files, tokenizer, max_tokens, seq_len, batch_size)
    found = None
    if search == "greedy":
        found = search_layers(teacher, linear, batches, budget)
        scores = found.first
    else:
        scores = score_layers(teacher, linear, batches)
    chosen = sorted(found.order) if found else (scores.choose(budget) if budget else None)
    result = {"scores": scores.to_dict(), "budget": budget, "chosen": chosen, "search": search}
    if found is not None:
        result |= {"order": found.order, "kl_after": found.kl_after}
    return result | {
        "student": "given" if student is not None else "seeded linear (untrained)",
        "tokens": scores.tokens,
        "seconds": round(time.perf_counter() - start, 2),
    }


def seed_by_measurement(
    teacher: DecoderLM,
    spec: str,
    files: Sequence[str | Path],
    tokenizer,
    mixer: dict | None = None,
    seed_value: int = 0,
) -> DecoderLM:
    """``seed(teacher, spec)`` for an ``auto:K`` spec: the seeded linear student scored on
    ``files`` (untrained, so a rougher ranking than a recipe's), its best K layers restored.

    Raises:
        DataError: no calibration files.
        ValueError: an impossible budget.
    """
    budget = auto_budget(spec, teacher.config.num_layers)
    linear = seed(teacher, attention_layers="none", mixer=mixer, seed=seed_value)
    scores = score_layers(teacher, linear, file_batches(teacher, files, tokenizer))
    layout = scores.layout(spec, budget, None, student="seeded linear (untrained)")
    return with_attention(linear, teacher, layout["chosen"], layout)
