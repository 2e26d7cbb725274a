"""Conversation training records, rendered and tokenised as the teacher's chat format does.

Records follow :mod:`mmdistill.chat` (``from``/``value`` or ``role``/``content`` turns, any-case
speakers, the ``<image>`` rule); image paths are relative to ``image_root`` (default: the JSONL's
directory). Each record is rendered whole with the teacher's
:class:`~mmdistill.chat_format.ChatFormat` and tokenised once: HoVLE-format teachers use their
template with images tiled and expanded to image-token spans; Hugging Face teachers use the
tokenizer's chat template (text only). A teacher with neither cannot render conversations.

A missing or unreadable image is skipped and counted, or fatal, per ``on_bad_image``; either way
the message names the path. Skipped records are reported on stderr the first time each is met
(the first three with their reason, then a running count at 10, 100, 1000, ...), and more than
``max_skipped_fraction`` of a file's records read so far (at least 20) stops the run.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from ..chat import record_messages
from ..chat_format import ChatFormat, chat_format_for
from ..errors import DataError
from ..frontends.multimodal import prepare_images
from .text import DataContext, LineFile, Sample

log = logging.getLogger(__name__)


class ConversationSource:
    """Conversation records of a JSONL file.

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
        self._format: ChatFormat | None = None
        self._read: set[int] = set()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def format(self) -> ChatFormat:
        """The teacher's chat format (built on first use: it loads the tokenizer)."""
        if self._format is None:
            self._format = chat_format_for(self.ctx.config, self.ctx.tokenizer)
        return self._format

    def get(self, index: int) -> Sample | None:
        where = f"{self.name}: record {index}"
        messages, images = record_messages(self.lines.record(index), where)
        if self.ctx.system_message is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.ctx.system_message})
        fmt = self.format
        fmt.check_images(messages, len(images), where)
        if fmt.kind == "plain":
            raise DataError(
                f"{where}: the teacher's tokenizer has no chat template, so conversations cannot "
                "be rendered; give text data instead"
            )
        try:
            pixel_values, tiles = prepare_images(
                self.ctx.config, [self.image_root / p for p in images]
            )
        except DataError as exc:
            if self.ctx.on_bad_image == "fail":
                raise DataError(
                    f"{where}: {exc} (set data.on_bad_image=skip to skip such records)"
                ) from exc
            self.skipped["bad_image"] += 1
            self._skip(index, where, exc)
            return None
        self._read.add(index)
        try:
            ids = fmt.encode(messages, tiles)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from exc
        return Sample(ids, pixel_values, splittable=pixel_values is None)

    def _skip(self, index: int, where: str, exc: DataError) -> None:
        """Report a skipped record (once per record) and stop past ``max_skipped_fraction``."""
        if index in self._bad:
            return
        self._bad.add(index)
        self._read.add(index)
        bad, read = len(self._bad), len(self._read)
        if bad <= 3:
            log.warning("skipped %s: %s", where, exc)
        elif bad in (10, 100, 1000, 10000, 100000):
            log.warning("%s: %d records skipped so far (bad images)", self.name, bad)
        limit = self.ctx.max_skipped_fraction
        if read >= 20 and bad / read > limit:
            raise DataError(
                f"{self.name}: {bad} of the {read} records read so far have a missing or "
                f"unreadable image, more than data.max_skipped_fraction={limit}; fix the images, "
                "or raise the limit to train on the rest"
            )
