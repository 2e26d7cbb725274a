"""Tests for caption data: reading image/caption JSONL files (one clear error per bad line) and
the cached tokenisation of their images into codes (hits without the tokenizer, new entries for
new content, nothing written on error, unreadable entries rebuilt).

The image tokenizer is a stand-in: the mean colour of each 8x8 block, quantised to the nearest
colour of a fixed palette (the background and the shapes world's colours)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdistill.data.captions import (
    CaptionRecord,
    encode_caption_file,
    read_caption_file,
)
from mmdistill.data.shapes_t2i import ShapeAttrs, caption_set, render, write_caption_set
from mmdistill.data.synthetic import BACKGROUND, COLOURS
from mmdistill.errors import DataError

PALETTE = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float32)


class BlockQuantiser:
    """Codes ``[n, H/8, W/8]``: per 8x8 block, the palette index nearest its mean colour."""

    def __init__(self, digest: str = "blocks-8-v1", fail_on_call: int | None = None):
        self.digest = digest
        self.calls = 0
        self.fail_on_call = fail_on_call

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("tokenizer failed")
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])
        n, height, width, _ = pixels.shape
        blocks = pixels.reshape(n, height // 8, 8, width // 8, 8, 3).mean(dim=(2, 4))
        nearest = torch.cdist(blocks.reshape(-1, 3), PALETTE).argmin(dim=-1)
        return nearest.reshape(n, height // 8, width // 8)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """The held-out caption set (24 images); returns its JSONL."""
    return write_caption_set(tmp_path / "data", "heldout")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _line(image: str, text: str = "a large red circle in the top left.") -> str:
    return json.dumps({"image": image, "caption": text})


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_read_caption_file_resolves_images_beside_the_file(dataset):
    records = read_caption_file(dataset)
    assert [r.caption for r in records] == [text for text, _ in caption_set("heldout")]
    assert records[0] == CaptionRecord(
        dataset.parent / "images/heldout_000.png", records[0].caption
    )
    assert all(r.image_path.is_file() for r in records)


def test_read_caption_file_uses_image_root_and_absolute_paths(dataset, tmp_path):
    image = dataset.parent / "images" / "heldout_000.png"
    jsonl = _write(tmp_path / "elsewhere.jsonl", ["", _line("heldout_000.png"), _line(str(image))])
    records = read_caption_file(jsonl, image_root=dataset.parent / "images")
    assert [r.image_path for r in records] == [image, image]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('["image", "caption"]', "is not a JSON object"),
        ('{"caption": "a large red circle in the top left."}', 'has no "image" key'),
        ('{"image": "images/heldout_000.png"}', 'has no "caption" key'),
        ('{"image": "images/heldout_000.png", "caption": 3}', '"caption" must be a string'),
        ('{"image": "images/heldout_000.png", "caption": "  "}', "has an empty caption"),
        ('{"image": "", "caption": "a cat"}', "has an empty image path"),
        ('{"image": "images/missing.png", "caption": "a cat"}', "missing.png not found"),
        ('{"image": "garbage.png", "caption": "a cat"}', "cannot read image"),
        ('{"image": "truncated.png", "caption": "a cat"}', "cannot read image"),
    ],
)
def test_each_bad_line_is_one_error_naming_file_and_line(dataset, line, message):
    (dataset.parent / "garbage.png").write_bytes(b"not a png at all")
    png = (dataset.parent / "images" / "heldout_000.png").read_bytes()
    (dataset.parent / "truncated.png").write_bytes(png[: len(png) // 2])
    bad = _write(dataset.parent / "bad.jsonl", [_line("images/heldout_001.png"), "", line])
    with pytest.raises(DataError, match=message) as info:
        read_caption_file(bad)
    assert f"{bad}, line 3" in str(info.value)


def test_missing_empty_and_non_utf8_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="caption file not found"):
        read_caption_file(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="has no records"):
        read_caption_file(_write(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl, line 1 is not UTF-8"):
        read_caption_file(tmp_path / "latin1.jsonl")


# --------------------------------------------------------------------------------------------
# Encoding and the cache
# --------------------------------------------------------------------------------------------


def test_encode_tokenises_once_and_then_reads_the_cache(dataset, tmp_path):
    tokenizer, cache = BlockQuantiser(), tmp_path / "cache"
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))

    first = encode_caption_file(dataset, tokenizer, cache, batch_size=10, progress=progress)
    assert tokenizer.calls == 3 and calls == [(10, 24), (20, 24), (24, 24)]
    assert first.captions == [text for text, _ in caption_set("heldout")]
    assert first.codes.dtype == torch.long and first.codes.shape == (24, 8, 8)
    assert first.source == dataset and first.cache_file.parent == cache
    assert [p.name for p in cache.iterdir()] == [first.cache_file.name]
    second = encode_caption_file(dataset, tokenizer, cache, progress=progress)
    assert tokenizer.calls == 3 and len(calls) == 3
    assert torch.equal(second.codes, first.codes) and second.captions == first.captions
    assert second.cache_file == first.cache_file


def test_codes_are_the_tokenizers_codes_in_record_order(dataset, tmp_path):
    codes = encode_caption_file(dataset, BlockQuantiser(), tmp_path / "cache", batch_size=5).codes
    images = [render(attrs) for _, attrs in caption_set("heldout")]
    assert torch.equal(codes, BlockQuantiser().encode_images(images))
    square = render(ShapeAttrs("blue", "square", "large", "top left"))
    assert BlockQuantiser().encode_images([square])[0, 2, 2] == 1 + list(COLOURS).index("blue")


def test_changed_captions_images_or_tokenizer_make_new_entries(dataset, tmp_path):
    cache = tmp_path / "cache"
    tokenizer = BlockQuantiser()
    names = {encode_caption_file(dataset, tokenizer, cache).cache_file.name}
    dataset.write_text(dataset.read_text().replace("small", "tiny", 1))
    names.add(encode_caption_file(dataset, tokenizer, cache).cache_file.name)
    render(ShapeAttrs("green", "circle", "small", "top left")).save(
        dataset.parent / "images" / "heldout_005.png"
    )
    names.add(encode_caption_file(dataset, tokenizer, cache).cache_file.name)
    names.add(encode_caption_file(dataset, BlockQuantiser("blocks-8-v2"), cache).cache_file.name)
    assert len(names) == 4 and tokenizer.calls == 3
    assert sorted(p.name for p in cache.iterdir()) == sorted(names)


def test_a_moved_dataset_finds_the_same_entry(dataset, tmp_path):
    cache, tokenizer = tmp_path / "cache", BlockQuantiser()
    first = encode_caption_file(dataset, tokenizer, cache)
    moved = shutil.copytree(dataset.parent, tmp_path / "moved")
    second = encode_caption_file(moved / dataset.name, tokenizer, cache)
    assert tokenizer.calls == 1 and second.cache_file == first.cache_file
    assert second.source == moved / dataset.name


def test_a_bad_image_fails_before_encoding_and_writes_nothing(dataset, tmp_path):
    images = dataset.parent / "images"
    (images / "heldout_023.png").write_bytes(b"\x89PNG broken")
    tokenizer, cache = BlockQuantiser(), tmp_path / "cache"
    with pytest.raises(DataError, match=re.escape(f"{dataset}, line 24: cannot read image")):
        encode_caption_file(dataset, tokenizer, cache, batch_size=4)
    assert tokenizer.calls == 0 and not cache.exists()
    (images / "heldout_023.png").unlink()
    with pytest.raises(DataError, match="line 24: image .*heldout_023.png not found"):
        encode_caption_file(dataset, tokenizer, cache)
    assert tokenizer.calls == 0 and not cache.exists()


def test_a_failing_or_malformed_tokenizer_writes_nothing(dataset, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        encode_caption_file(dataset, BlockQuantiser(fail_on_call=2), cache, batch_size=10)
    assert not cache.exists()
    floats = BlockQuantiser()
    floats.encode_images = lambda images: torch.zeros(len(images), 8, 8)
    with pytest.raises(ValueError, match="integer tensor"):
        encode_caption_file(dataset, floats, cache)
    short = BlockQuantiser()
    short.encode_images = lambda images: torch.zeros(len(images) - 1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"codes \(23, 8, 8\) for 24 images"):
        encode_caption_file(dataset, short, cache)
    with pytest.raises(ValueError, match="digest"):
        encode_caption_file(dataset, BlockQuantiser(digest=""), cache)
    with pytest.raises(ValueError, match="batch_size"):
        encode_caption_file(dataset, BlockQuantiser(), cache, batch_size=0)
    assert not cache.exists()


def test_unreadable_entries_are_rebuilt_and_temporary_files_ignored(dataset, tmp_path):
    cache, tokenizer = tmp_path / "cache", BlockQuantiser()
    entry = encode_caption_file(dataset, tokenizer, cache)
    (cache / f".{entry.cache_file.name}.tmp-1234").write_bytes(b"half a file")
    assert torch.equal(encode_caption_file(dataset, tokenizer, cache).codes, entry.codes)
    assert tokenizer.calls == 1
    data = entry.cache_file.read_bytes()
    entry.cache_file.write_bytes(data[: len(data) // 2])
    again = encode_caption_file(dataset, tokenizer, cache)
    assert tokenizer.calls == 2 and torch.equal(again.codes, entry.codes)
    assert entry.cache_file.read_bytes() == data


def test_the_default_cache_is_under_the_cache_root(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MMDISTILL_CACHE", str(tmp_path / "root"))
    codes = encode_caption_file(dataset, BlockQuantiser())
    assert codes.cache_file.parent == tmp_path / "root" / "captions"
