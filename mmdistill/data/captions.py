"""Caption data for text-to-image training: reading image/caption files, and tokenising their
images once into image codes, cached.

**Format.** JSONL, one object per non-empty line: ``{"image": "images/000.png", "caption":
"a large red circle in the top left."}``; other keys are ignored. A relative image path is
relative to ``image_root`` when one is given, else to the caption file's directory. Each problem
(not UTF-8, not a JSON object, a missing or non-string key, an empty caption, a missing or
unreadable image) is one :class:`~mmdistill.errors.DataError` naming the file and line.

**Cache.** :func:`encode_caption_file` tokenises every image with an image tokenizer (anything
with ``encode_images(list[PIL.Image]) -> LongTensor [n, h, w]`` and a ``digest`` string that
changes whenever its codes would) and stores the codes in
``cache_dir/<key>.safetensors`` (default ``cache_root()/"captions"``). The key is the SHA-256
of the cache format, the caption file's bytes, the tokenizer's digest and each image's bytes
(SHA-256, in record order): a content address, so an edited caption, image or tokenizer makes a
new entry, while a copied or moved dataset (other paths, other modification times) finds the
same one. Finding the entry costs one read of each image, no decoding. An entry holds
``codes`` (int32 ``[n, h, w]``) and ``captions`` (the captions as UTF-8 JSON, a uint8 tensor),
no pickle; it is written to a temporary name and renamed, so a half-written entry is never
read, and an entry that cannot be read or does not match is rebuilt. On a miss every image is
decoded before any is encoded, so a bad image fails before the tokenizer runs and nothing is
written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..errors import DataError
from ..files import atomic_write_bytes, cache_root, sha256_file
from ..frontends.hovle_image import open_image
from .text import json_record

__all__ = [
    "CACHE_FORMAT",
    "CaptionCodes",
    "CaptionRecord",
    "ImageCodeTokenizer",
    "encode_caption_file",
    "read_caption_file",
]

CACHE_FORMAT = "mmdistill-caption-codes-1"


class ImageCodeTokenizer(Protocol):
    """What :func:`encode_caption_file` needs from an image tokenizer."""

    digest: str  # changes whenever the codes of some image would change

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Codes ``[n, h, w]`` (integers) of ``n`` RGB images."""
        ...


@dataclass(frozen=True)
class CaptionRecord:
    """One line of a caption file: the resolved image path and the caption, as written."""

    image_path: Path
    caption: str


@dataclass
class CaptionCodes:
    """A caption file's captions and image codes.

    Attributes:
        captions: one caption per record, in file order.
        codes: ``LongTensor [n, h, w]``, the image codes of record ``i`` at ``codes[i]``.
        source: the caption file.
        cache_file: the cache entry the codes were read from or written to.
    """

    captions: list[str]
    codes: torch.Tensor
    source: Path
    cache_file: Path


def _decode(path: Path, where: str) -> Image.Image:
    try:
        return open_image(path)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from exc


def _record(raw: bytes, where: str, root: Path) -> CaptionRecord:
    try:
        value = json_record(raw.decode("utf-8"), where)
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not UTF-8: {exc}") from exc
    for key in ("image", "caption"):
        if key not in value:
            raise DataError(f'{where} has no "{key}" key')
        if not isinstance(value[key], str):
            raise DataError(f'{where}: "{key}" must be a string, got {value[key]!r}')
    if not value["caption"].strip():
        raise DataError(f"{where} has an empty caption")
    if not value["image"].strip():
        raise DataError(f"{where} has an empty image path")
    return CaptionRecord(root / value["image"], value["caption"])


def _file_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"caption file not found: {path}")
    return path.read_bytes()


def _read_records(
    path: Path, data: bytes, image_root: str | Path | None
) -> list[tuple[CaptionRecord, str]]:
    """``(record, where)`` of each non-empty line of ``data`` (the bytes of ``path``); images
    are checked only for existence."""
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            where = f"{path}, line {number}"
            record = _record(raw, where, root)
            if not record.image_path.is_file():
                raise DataError(f"{where}: image {record.image_path} not found")
            out.append((record, where))
    if not out:
        raise DataError(f"{path} has no records")
    return out


def read_caption_file(
    path: str | Path, image_root: str | Path | None = None
) -> list[CaptionRecord]:
    """The records of a caption JSONL file, every image checked by decoding it.

    Args:
        path: the JSONL file (format in the module docstring).
        image_root: directory relative image paths start from (default: the file's directory).

    Raises:
        DataError: the file is missing or empty, or a line is bad (the message names the line).
    """
    path = Path(path)
    records = _read_records(path, _file_bytes(path), image_root)
    for record, where in records:
        _decode(record.image_path, where)
    return [record for record, _ in records]


def _cache_key(data: bytes, records: list[CaptionRecord], tokenizer_digest: str) -> str:
    """The content address of the entry for a caption file's bytes (see the module docstring)."""
    digest = hashlib.sha256()
    parts = [CACHE_FORMAT, hashlib.sha256(data).hexdigest(), tokenizer_digest]
    for part in parts + [sha256_file(record.image_path) for record in records]:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def _load_entry(cache_file: Path, captions: list[str]) -> torch.Tensor | None:
    """The codes of a readable entry for ``captions``; None for a missing or unusable one."""
    if not cache_file.is_file():
        return None
    try:
        with safe_open(str(cache_file), framework="pt") as f:
            stored = json.loads(f.get_tensor("captions").numpy().tobytes().decode("utf-8"))
            codes = f.get_tensor("codes")
    except (SafetensorError, OSError, ValueError):
        return None
    if stored != captions or codes.ndim != 3 or codes.shape[0] != len(captions):
        return None
    return codes.long()


def _check_codes(codes: object, n: int, previous: list[torch.Tensor]) -> torch.Tensor:
    """The tokenizer's codes for ``n`` images, checked: integers in int32 range, ``[n, h, w]``
    with the ``h, w`` of the previous batches."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.ndim != 3:
        raise ValueError(f"encode_images must return an integer tensor [n, h, w], got {codes!r}")
    if codes.shape[0] != n or (previous and codes.shape[1:] != previous[0].shape[1:]):
        raise ValueError(f"encode_images returned codes {tuple(codes.shape)} for {n} images")
    if codes.numel() and (codes.min() < 0 or codes.max() > torch.iinfo(torch.int32).max):
        raise ValueError("encode_images returned codes outside [0, 2**31)")
    return codes.detach().to("cpu", torch.long)


def _encode(
    records: list[tuple[CaptionRecord, str]],
    tokenizer: ImageCodeTokenizer,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> torch.Tensor:
    """Every record's codes: all images decoded first (a bad one fails before any encoding)."""
    for record, where in records:
        _decode(record.image_path, where)
    chunks: list[torch.Tensor] = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        images = [_decode(record.image_path, where) for record, where in batch]
        chunks.append(_check_codes(tokenizer.encode_images(images), len(batch), chunks))
        if progress is not None:
            progress(start + len(batch), len(records))
    return torch.cat(chunks)


def encode_caption_file(
    path: str | Path,
    tokenizer: ImageCodeTokenizer,
    cache_dir: str | Path | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> CaptionCodes:
    """A caption file's captions and image codes, tokenised once and cached.

    Args:
        path: the caption JSONL file (format in the module docstring).
        tokenizer: an image tokenizer: ``encode_images(list[PIL.Image]) -> LongTensor [n, h, w]``
            and a ``digest`` string.
        cache_dir: where entries live (default ``cache_root()/"captions"``).
        image_root: directory relative image paths start from (default: the file's directory).
        batch_size: images per ``encode_images`` call.
        progress: called as ``progress(done, total)`` after each batch is encoded (not on a
            cache hit).

    Raises:
        DataError: the file or a line of it is bad (nothing is encoded or written).
        ValueError: ``batch_size`` is below 1, or the tokenizer has no digest or returned
            malformed codes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not isinstance(getattr(tokenizer, "digest", None), str) or not tokenizer.digest:
        raise ValueError("the image tokenizer needs a non-empty string `digest`")
    path = Path(path)
    data = _file_bytes(path)
    records = _read_records(path, data, image_root)
    captions = [record.caption for record, _ in records]
    key = _cache_key(data, [record for record, _ in records], tokenizer.digest)
    directory = Path(cache_dir) if cache_dir is not None else cache_root() / "captions"
    cache_file = directory / f"{key}.safetensors"
    codes = _load_entry(cache_file, captions)
    if codes is None:
        codes = _encode(records, tokenizer, batch_size, progress)
        text = torch.frombuffer(bytearray(json.dumps(captions).encode("utf-8")), dtype=torch.uint8)
        entry = {"codes": codes.to(torch.int32), "captions": text}
        atomic_write_bytes(cache_file, save(entry, metadata={"format": CACHE_FORMAT}))
    return CaptionCodes(captions, codes, path, cache_file)
