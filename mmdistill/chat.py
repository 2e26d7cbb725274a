"""Conversation records: the one parser behind training data, ``mmdistill eval`` and ``generate``.

A record (one JSONL line)::

    {"image": "images/a.png" | ["a.png", "b.png"],             # optional; "images" also works
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Each turn is written either in the LLaVA/InternVL convention (``from``/``value``) or in the
chat-message convention (``role``/``content``). Speakers are case-insensitive: ``human`` or
``user`` is the user, ``gpt`` or ``assistant`` the assistant, ``system`` the system. Image paths
are returned as written; the caller resolves them.

**The ``<image>`` rule** (InternVL's): a turn's ``<image>`` marks where an image goes, the i-th
placeholder taking the i-th image. When images are given and no turn has a placeholder, one
``<image>\\n`` per image is put in front of the first user turn; any other count that differs
from the number of images is an error. With no images, ``<image>`` is left in the text (a
multimodal chat format rejects it, see :meth:`mmdistill.chat_format.ChatFormat.check_images`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .errors import DataError

__all__ = ["IMAGE_PLACEHOLDER", "SPEAKER_ROLES", "place_images", "record_messages"]

IMAGE_PLACEHOLDER = "<image>"
SPEAKER_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _message(turn: object, where: str) -> dict[str, str]:
    """One turn as ``{"role", "content"}``; raises DataError naming ``where``."""
    if isinstance(turn, Mapping):
        speaker = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = SPEAKER_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is not None and isinstance(value, str):
            return {"role": role, "content": value}
    raise DataError(
        f'{where} needs "from" (or "role") in {sorted(SPEAKER_ROLES)}, any case, and a string '
        '"value" (or "content")'
    )


def place_images(
    messages: Sequence[Mapping[str, str]], count: int, where: str
) -> list[dict[str, str]]:
    """Apply the ``<image>`` rule for ``count`` images (see the module docstring).

    Args:
        messages: ``{"role", "content"}`` dicts.
        count: images that go with them.
        where: names the conversation in errors.

    Returns:
        New message dicts (the input is not modified).

    Raises:
        DataError: placeholders that do not match the images, or no user turn to put them in.
    """
    out = [dict(m) for m in messages]
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in out)
    if count == 0 or placeholders == count:
        return out
    if placeholders:
        raise DataError(
            f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders for {count} images"
        )
    first = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
    if first is None:
        raise DataError(f"{where}: no user turn to put the {IMAGE_PLACEHOLDER} placeholders in")
    out[first]["content"] = (IMAGE_PLACEHOLDER + "\n") * count + out[first]["content"]
    return out


def record_messages(record: Mapping, where: str) -> tuple[list[dict[str, str]], list[str]]:
    """Chat messages (``<image>`` rule applied) and image paths (as written) of one record.

    Args:
        record: a parsed JSONL record with ``conversations``.
        where: names the record in errors (e.g. ``"data.jsonl:3"``).

    Returns:
        ``([{"role": "user"|"assistant"|"system", "content": str}, ...], [image path, ...])``.

    Raises:
        DataError: naming ``where`` for a malformed record.
    """
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: "conversations" must be a non-empty list')
    messages = [_message(turn, f"{where}: conversations[{j}]") for j, turn in enumerate(turns)]
    images = record.get("image", record.get("images")) or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f'{where}: "image" must be a path or a list of paths')
    return place_images(messages, len(images), where), images
