"""How a model renders and tokenises a conversation, the same way in training, eval and generate.

:func:`chat_format_for` picks one of three formats from the model's config and tokenizer:

* ``"hovle"`` (HoVLE-format models): :func:`~mmdistill.frontends.hovle_image.render_chat` with the
  model's template (``config.front_end["template"]``, default ``internlm2-chat``); each
  ``<image>`` is expanded to its image-token span by
  :func:`~mmdistill.frontends.hovle.expand_prompt`; tokenised with the tokenizer's BOS;
* ``"template"``: the tokenizer's own Jinja chat template (it writes its own BOS);
* ``"plain"`` (no template, or ``use_template=False``): ``content\\n`` per non-system message,
  for base models in eval and generate (training data needs a real template).

A conversation is rendered whole and tokenised once (:meth:`ChatFormat.encode`); a prompt is the
conversation so far with the assistant prefix (``add_generation_prompt=True``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .chat import IMAGE_PLACEHOLDER, place_images
from .errors import DataError
from .frontends.hovle import is_hovle
from .frontends.hovle_image import render_chat
from .frontends.multimodal import expand_prompt, is_multimodal, prepare_images
from .tokenizer import Tokenizer

__all__ = ["ChatFormat", "build_generation_prompt", "chat_format_for"]

Messages = Sequence[Mapping[str, str]]
_END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class ChatFormat:
    """A model's conversation format.

    Attributes:
        kind: ``"hovle"``, ``"template"`` or ``"plain"``.
        config: the model's :class:`~mmdistill.lm_config.LMConfig` (front-end settings).
        tokenizer: the model's tokenizer.
        stop_ids: token ids that end a generated answer.
        stop_text: generated text is cut at its first occurrence (the plain format's newline).
    """

    kind: str
    config: Any
    tokenizer: Tokenizer
    stop_ids: list[int]
    stop_text: str | None = None

    @property
    def multimodal(self) -> bool:
        """Whether the model takes images (a HoVLE or LLaVA front-end)."""
        return is_multimodal(self.config)

    @property
    def add_special_tokens(self) -> bool:
        """Passed to ``tokenizer.encode`` (False when the template writes its own BOS)."""
        return self.kind != "template"

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """The conversation as text, ``<image>`` placeholders left in.

        Raises:
            DataError: turns the template cannot render (bad order, unknown template).
        """
        if self.kind == "hovle":
            template = self.config.front_end.get("template") or "internlm2-chat"
            try:
                return render_chat(messages, template, add_generation_prompt=add_generation_prompt)
            except ValueError as exc:
                raise DataError(str(exc)) from exc
        if self.kind == "template":
            return self.tokenizer.inner.apply_chat_template(
                [dict(m) for m in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        return "".join(f"{m['content']}\n" for m in messages if m["role"] != "system")

    def check_images(self, messages: Messages, count: int, where: str) -> None:
        """Raise DataError unless ``count`` images fit this model and ``messages``' placeholders."""
        if count and not self.multimodal:
            raise DataError(
                f"{where} has images, but the model has a text-only front-end; use text-only "
                "conversations or a multimodal (HoVLE or LLaVA) model"
            )
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if self.multimodal and placeholders != count:
            raise DataError(
                f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders for {count} images"
            )

    def encode_text(self, text: str, tiles: Sequence[int] = ()) -> list[int]:
        """Token ids of rendered text, its ``<image>`` placeholders expanded with the first
        images' ``tiles`` (multimodal models)."""
        if self.multimodal:
            count = text.count(IMAGE_PLACEHOLDER)
            if count > len(tiles):
                raise DataError(f"{count} {IMAGE_PLACEHOLDER} placeholders but {len(tiles)} images")
            text = expand_prompt(self.config, text, list(tiles[:count]))
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens)

    def encode(
        self, messages: Messages, tiles: Sequence[int] = (), add_generation_prompt: bool = False
    ) -> list[int]:
        """Token ids of a whole conversation (rendered, then tokenised once).

        Args:
            messages: ``{"role", "content"}`` dicts, images placed (:func:`mmdistill.chat.place_images`).
            tiles: tiles per image, in placeholder order.
            add_generation_prompt: end with the assistant prefix (a prompt to answer).
        """
        return self.encode_text(self.render(messages, add_generation_prompt), tiles)

    def answer_header(self) -> list[int]:
        """The token ids that open an assistant turn inside a conversation (the assistant
        prefix, tokenised in context); empty for the plain format, which has none."""
        if self.kind == "plain":
            return []
        turn = [{"role": "user", "content": "Hi."}]
        base, prompt = self.encode(turn), self.encode(turn, add_generation_prompt=True)
        same = next(
            (i for i, (a, b) in enumerate(zip(base, prompt, strict=False)) if a != b), len(base)
        )
        return prompt[same:]


def _stop_ids(config: Any, tokenizer: Tokenizer, end_of_turn: bool) -> list[int]:
    eos = config.eos_token_id
    stops = [] if eos is None else [eos] if isinstance(eos, int) else [int(v) for v in eos]
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    end = tokenizer.token_to_id(_END_OF_TURN) if end_of_turn else None
    return sorted(set(stops + ([end] if end is not None else [])))


def chat_format_for(config: Any, tokenizer: Tokenizer, use_template: bool = True) -> ChatFormat:
    """The chat format of a model: HoVLE's template, the tokenizer's template, or plain text.

    Args:
        config: the model's config.
        tokenizer: its tokenizer.
        use_template: False forces the plain format (raw prompts for base models).

    Returns:
        A :class:`ChatFormat`.
    """
    if use_template and is_hovle(config):
        return ChatFormat("hovle", config, tokenizer, _stop_ids(config, tokenizer, True))
    inner = getattr(tokenizer, "inner", None)
    if use_template and getattr(inner, "chat_template", None):
        return ChatFormat("template", config, tokenizer, _stop_ids(config, tokenizer, True))
    return ChatFormat("plain", config, tokenizer, _stop_ids(config, tokenizer, False), "\n")


def build_generation_prompt(
    model: Any,
    tokenizer: Tokenizer,
    prompt: str,
    images: Sequence[str | Path] = (),
    use_template: bool = True,
) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """Token ids (and image tiles) of a one-turn prompt, as the model's chat format writes it.

    Args:
        model: teacher or student (a :class:`~mmdistill.model.DecoderLM`).
        tokenizer: its tokenizer.
        prompt: the user's text (``<image>`` optional: the :mod:`mmdistill.chat` rule applies).
        images: image paths (multimodal models only).
        use_template: False feeds ``prompt`` raw (plus the tokenizer's BOS).

    Returns:
        ``(ids, pixel_values [tiles, 3, s, s] or None, stop_ids)``.

    Raises:
        DataError: images for a text-only model, a missing or unreadable image.
    """
    fmt = chat_format_for(model.config, tokenizer, use_template)
    paths = [Path(p) for p in images]
    messages = place_images([{"role": "user", "content": prompt}], len(paths), "the prompt")
    fmt.check_images(messages, len(paths), "the prompt")
    pixel_values, tiles = prepare_images(model.config, paths)
    if use_template:
        ids = fmt.encode(messages, tiles, add_generation_prompt=True)
    else:
        ids = fmt.encode_text(messages[0]["content"], tiles)
    return ids, pixel_values, fmt.stop_ids
