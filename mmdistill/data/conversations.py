"""Multimodal conversations in the InternVL/LLaVA JSONL convention, rendered like the teacher.

A record::

    {"image": "images/a.png" | ["a.png", "b.png"],            # optional
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

``from`` is ``human``/``user``, ``gpt``/``assistant`` or ``system``. Image paths are relative to
``image_root`` (default: the JSONL's directory). A record with images but no ``<image>``
placeholder gets one ``<image>\\n`` per image in front of its first user turn (InternVL's rule).

Rendering:

* HoVLE-format teachers: :func:`~mmdistill.frontends.hovle_image.render_chat` with the teacher's
  template (``config.front_end["template"]``), images tiled by
  :func:`~mmdistill.frontends.hovle.prepare_images` and each ``<image>`` expanded to its
  image-token span by :func:`~mmdistill.frontends.hovle.expand_prompt`;
* Hugging Face teachers: the tokenizer's own chat template (text only).

A missing or unreadable image is skipped and counted, or fatal, per ``on_bad_image``; either way
the message names the path.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import DataError
from ..frontends.hovle import expand_prompt, is_hovle, prepare_images
from ..frontends.hovle_image import IMAGE_PLACEHOLDER, render_chat
from .text import DataContext, LineFile, Sample

ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def record_messages(record: dict, where: str) -> tuple[list[dict[str, str]], list[str]]:
    """Chat messages and image paths (as written) of one record.

    Raises:
        DataError: naming ``where`` for a malformed record.
    """
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: "conversations" must be a non-empty list')
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{j}] is not an object")
        role = ROLE_NAMES.get(str(turn.get("from", turn.get("role"))))
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise DataError(
                f'{where}: conversations[{j}] needs "from" in {sorted(ROLE_NAMES)} and a string '
                '"value"'
            )
        messages.append({"role": role, "content": value})
    images = record.get("image", record.get("images")) or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f'{where}: "image" must be a path or a list of paths')
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if images and placeholders == 0:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        prefix = (IMAGE_PLACEHOLDER + "\n") * len(images)
        messages[first] = {"role": "user", "content": prefix + messages[first]["content"]}
    elif placeholders != len(images):
        raise DataError(
            f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images"
        )
    return messages, images


class ConversationSource:
    """InternVL/LLaVA conversation records of a JSONL file.

    Args:
        path: the JSONL file.
        ctx: rendering context (teacher config, tokenizer, system message, bad-image policy).
        image_root: directory image paths are relative to (default: the file's directory).
        max_samples: use only the first N records.
    """

    def __init__(
        self,
        path: str | Path,
        ctx: DataContext,
        image_root: str | Path | None = None,
        max_samples: int | None = None,
    ):
        self.name = str(path)
        self.ctx = ctx
        self.lines = LineFile(path, max_samples)
        self.image_root = Path(image_root) if image_root is not None else Path(path).parent
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.lines)

    def get(self, index: int) -> Sample | None:
        where = f"{self.name}: record {index}"
        messages, images = record_messages(self.lines.record(index), where)
        if self.ctx.system_message is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.ctx.system_message})
        config = self.ctx.config
        if is_hovle(config):
            return self._render_hovle(messages, images, where)
        if images:
            raise DataError(
                f"{where} has images, but the teacher has a text-only front-end; use text-only "
                "conversations or a multimodal (HoVLE-format) teacher"
            )
        template = getattr(self.ctx.tokenizer, "inner", None)
        if template is None or not getattr(template, "chat_template", None):
            raise DataError(
                f"{where}: the teacher's tokenizer has no chat template, so conversations cannot "
                "be rendered; give text data instead"
            )
        text = template.apply_chat_template(messages, tokenize=False)
        return Sample(self.ctx.tokenizer.encode(text, add_special_tokens=False))

    def _render_hovle(self, messages: list[dict], images: list[str], where: str) -> Sample | None:
        config = self.ctx.config
        paths = [self.image_root / p for p in images]
        try:
            pixel_values, tiles = prepare_images(config, paths)
        except DataError as exc:
            if self.ctx.on_bad_image == "fail":
                raise DataError(
                    f"{where}: {exc} (set data.on_bad_image=skip to skip such records)"
                ) from exc
            self.skipped["bad_image"] += 1
            return None
        template = config.front_end.get("template") or "internlm2-chat"
        try:
            text = render_chat(messages, template, add_generation_prompt=False)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from exc
        text = expand_prompt(config, text, tiles)
        ids = self.ctx.tokenizer.encode(text, add_special_tokens=True)
        return Sample(ids, pixel_values, splittable=pixel_values is None)
