"""Conversation records for evaluation: the answer tokens to score and the questions to ask.

Records are parsed by :mod:`mmdistill.chat` and rendered whole with the model's
:class:`~mmdistill.chat_format.ChatFormat`, then tokenised once, exactly as training data is.
The scored tokens are each assistant turn's text and the template's end-of-turn marker: the
tokens between the prompt (the turns before it, with the assistant prefix) and the conversation up
to and including it. An assistant turn is also a question for answer accuracy when the record's
``task`` is ``"qa"``, or when it has no ``task`` and the reference answer is one word; its prompt
is the conversation so far (earlier turns with their reference answers) and its images are those
whose ``<image>`` the prompt holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..answers import Question
from ..chat import IMAGE_PLACEHOLDER, record_messages
from ..chat_format import ChatFormat
from ..errors import DataError
from ..frontends.multimodal import prepare_images
from .documents import ScoredSequence


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _is_question(record: Mapping, reference: str) -> bool:
    task = record.get("task")
    if task is not None:
        return task == "qa"
    return len(reference.split()) == 1


def _image_paths(names: Sequence[str], base: Path, where: str) -> list[Path]:
    paths = [base / name for name in names]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{where}: image file not found: {p}")
    return paths


def conversation(
    record: Mapping, base: Path, where: str, fmt: ChatFormat
) -> tuple[ScoredSequence, list[Question]]:
    """Tokenise one conversation record: its answer-token targets and its questions.

    Args:
        record: a JSONL record with ``conversations``.
        base: the directory image paths are relative to.
        where: names the record in errors.
        fmt: the chat format of the model whose tokenizer and template are used.

    Returns:
        ``(ScoredSequence, [Question, ...])``.

    Raises:
        DataError: a malformed record, a missing image, or a template that does not render
            conversations as prefixes of each other.
    """
    messages, names = record_messages(record, where)
    images = _image_paths(names, base, where)
    fmt.check_images(messages, len(images), where)
    tiles = prepare_images(fmt.config, images)[1]
    try:
        full = fmt.render(messages)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    ids = fmt.encode_text(full, tiles)
    targets = [False] * len(ids)
    questions = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = fmt.render(messages[:k], True)
        done = fmt.render(messages[: k + 1])
        if not (full.startswith(prompt) and full.startswith(done)):
            raise DataError(
                f"{where}: the chat template does not render conversations as prefixes of each "
                "other, so answer tokens cannot be located"
            )
        prompt_ids = fmt.encode_text(prompt, tiles)
        start = _common_prefix(prompt_ids, ids)
        stop = _common_prefix(fmt.encode_text(done, tiles), ids)
        for j in range(max(start, 1), stop):
            targets[j] = True
        if _is_question(record, message["content"]):
            asked = messages[k - 1]["content"] if k and messages[k - 1]["role"] == "user" else ""
            asked = asked.replace(IMAGE_PLACEHOLDER, "").strip()
            shown = images[: prompt.count(IMAGE_PLACEHOLDER)]
            questions.append(Question(prompt_ids, shown, asked, message["content"]))
    return ScoredSequence(ids, targets, images), questions
