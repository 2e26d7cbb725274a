"""Tests for the procedural multimodal data: determinism, splits, ground truth, files, scoring.

The ground-truth checks do not trust the generator: they find the shapes in the pixels with a
flood fill, name their colours by the nearest pure colour and their kinds by their outline, and
answer every question and re-read every caption from what was found.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdistill.chat import IMAGE_PLACEHOLDER
from mmdistill.data import synthetic
from mmdistill.data.synthetic import (
    CAPTION_PROMPT,
    QA_KINDS,
    answer_accuracy,
    build_demo_dataset,
    generate_samples,
    kjv_verses,
    majority_baseline_accuracy,
    normalize_answer,
    scene_split,
    write_multimodal_jsonl,
    write_text_corpus,
)

# Pure reference colours, independent of the generator's palette values.
PURE = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
}


def _png(image: Image.Image) -> bytes:
    return synthetic._png_bytes(image)


def _colour_name(rgb: np.ndarray) -> str:
    return min(PURE, key=lambda c: float(np.sum((rgb.astype(float) - PURE[c]) ** 2)))


def _components(rgb: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of pixels that differ from the corner pixel (the background)."""
    fg = np.any(rgb != rgb[0, 0], axis=-1)
    seen = np.zeros_like(fg)
    regions = []
    h, w = fg.shape
    for y0, x0 in zip(*np.nonzero(fg), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(np.array(pixels))
    return regions


def _detect(image: Image.Image) -> list[dict]:
    """Find the shapes in an image, without using the generator's record of them."""
    rgb = np.asarray(image)
    size = rgb.shape[0]
    found = []
    for pixels in _components(rgb):
        colours = {tuple(c) for c in rgb[pixels[:, 0], pixels[:, 1]]}
        assert len(colours) == 1, f"a region has several colours: {colours}"
        ys, xs = pixels[:, 0], pixels[:, 1]
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        width_top = np.sum(ys == y0)
        width_bottom = np.sum(ys == y1)
        if len(pixels) == (y1 - y0 + 1) * (x1 - x0 + 1):
            kind = "square"
        elif width_bottom >= 2 * width_top:
            kind = "triangle"
        else:
            assert abs(int(width_top) - int(width_bottom)) <= 1, "not a circle either"
            kind = "circle"
        found.append(
            {
                "shape": kind,
                "colour": _colour_name(rgb[ys[0], xs[0]]),
                "extent": int(x1 - x0 + 1),
                "row": "top" if (y0 + y1) / 2 < size / 2 else "bottom",
                "column": "left" if (x0 + x1) / 2 < size / 2 else "right",
            }
        )
    for f in found:  # large shapes span about 0.7-0.8 of a cell, small ones about 0.4-0.45
        f["size"] = "large" if f["extent"] > 0.55 * size / 2 else "small"
    return found


def _answer(question: str, objs: list[dict]) -> str:
    """Answer a question from detected shapes; fail on an ambiguous question."""

    def one(hits: list[dict]) -> dict:
        assert len(hits) == 1, f"ambiguous question {question!r}"
        return hits[0]

    where = {
        "on the left": ("column", "left"),
        "on the right": ("column", "right"),
        "at the top": ("row", "top"),
        "at the bottom": ("row", "bottom"),
    }
    if question == "How many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (circle|square|triangle)s are there\?", question):
        return str(sum(o["shape"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(o["colour"] == m[1] for o in objs))
    if m := re.fullmatch(r"What colour is the shape in the (top|bottom) (left|right)\?", question):
        return one([o for o in objs if (o["row"], o["column"]) == (m[1], m[2])])["colour"]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return one([o for o in objs if o["shape"] == m[1]])["colour"]
    if m := re.fullmatch(r"What shape is in the (top|bottom) (left|right)\?", question):
        return one([o for o in objs if (o["row"], o["column"]) == (m[1], m[2])])["shape"]
    if m := re.fullmatch(r"What shape is (.+)\?", question):
        key, value = where[m[1]]
        return one([o for o in objs if o[key] == value])["shape"]
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"What size is the (\w+) (\w+)\?", question):
        return one([o for o in objs if (o["colour"], o["shape"]) == (m[1], m[2])])["size"]
    if m := re.fullmatch(r"Is the (\w+) (\w+) on the left or the right\?", question):
        return one([o for o in objs if (o["colour"], o["shape"]) == (m[1], m[2])])["column"]
    raise AssertionError(f"unexpected question {question!r}")


# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_text() -> None:
    a = generate_samples(12, seed=3)
    b = generate_samples(12, seed=3)
    assert [_png(s.image) for s in a] == [_png(s.image) for s in b]
    assert [(s.caption, s.qa, s.qa_kinds, s.shapes) for s in a] == [
        (s.caption, s.qa, s.qa_kinds, s.shapes) for s in b
    ]
    # A longer run extends a shorter one; another seed gives other images.
    longer = generate_samples(20, seed=3)
    assert [_png(s.image) for s in longer[:12]] == [_png(s.image) for s in a]
    other = generate_samples(12, seed=4)
    assert sum(_png(x.image) == _png(y.image) for x, y in zip(a, other, strict=True)) <= 1


def test_splits_never_share_an_image() -> None:
    train = generate_samples(300, seed=0, split="train") + generate_samples(100, seed=1)
    held_out = generate_samples(100, seed=0, split="eval") + generate_samples(
        50, seed=5, split="eval"
    )
    assert all(scene_split(s.shapes, 56) == "train" for s in train)
    assert all(scene_split(s.shapes, 56) == "eval" for s in held_out)
    assert not {_png(s.image) for s in train} & {_png(s.image) for s in held_out}
    assert not {s.scene_id for s in train} & {s.scene_id for s in held_out}


@pytest.mark.parametrize(("image_size", "max_shapes"), [(56, 3), (64, 4), (32, 4)])
def test_every_stated_attribute_is_in_the_image(image_size: int, max_shapes: int) -> None:
    samples = generate_samples(60, seed=11, image_size=image_size, max_shapes=max_shapes)
    samples += generate_samples(20, seed=11, image_size=image_size, split="eval")
    asked: Counter[str] = Counter()
    for s in samples:
        rgb = np.asarray(s.image)
        assert s.image.mode == "RGB" and rgb.shape == (image_size, image_size, 3)
        objs = _detect(s.image)
        assert len(objs) == len(s.shapes)
        for shape in s.shapes:
            x, y = shape["center"]
            assert _colour_name(rgb[y, x]) == shape["colour"]
        stated = Counter(
            (d["shape"], d["colour"], d["size"], d["row"], d["column"]) for d in s.shapes
        )
        seen = Counter((o["shape"], o["colour"], o["size"], o["row"], o["column"]) for o in objs)
        assert stated == seen
        # The caption names exactly what is there.
        pattern = r"a (small|large) (\w+) (\w+) in the (top|bottom) (left|right)"
        named = Counter((sh, c, sz, r, col) for sz, c, sh, r, col in re.findall(pattern, s.caption))
        assert named == seen
        # Every answer is what the pixels say, and a single normalised word.
        for (question, answer), kind in zip(s.qa, s.qa_kinds, strict=True):
            assert answer == _answer(question, objs), question
            assert normalize_answer(answer) == answer
            asked[kind] += 1
    assert set(asked) == set(QA_KINDS)


def test_jsonl_schema_and_images(tmp_path: Path) -> None:
    samples = generate_samples(5, seed=2)
    path = write_multimodal_jsonl(samples, tmp_path, "demo")
    assert path == tmp_path / "demo.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["task"] for r in records] == ["qa", "caption"] * 5
    for i, s in enumerate(samples):
        qa, cap = records[2 * i], records[2 * i + 1]
        assert qa["image"] == cap["image"] == f"images/demo_{i:06d}.png"
        assert _png(Image.open(path.parent / qa["image"])) == _png(s.image)
        turns = qa["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(s.qa)
        assert turns[0]["value"].startswith(IMAGE_PLACEHOLDER + "\n")
        assert sum(IMAGE_PLACEHOLDER in t["value"] for t in turns) == 1
        pairs = [(turns[j]["value"], turns[j + 1]["value"]) for j in range(0, len(turns), 2)]
        assert [(q.removeprefix(IMAGE_PLACEHOLDER + "\n"), a) for q, a in pairs] == s.qa
        assert qa["qa_kinds"] == s.qa_kinds
        assert cap["conversations"] == [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": s.caption},
        ]
    # Rewriting fewer samples removes the stale images; no temporary files are left.
    write_multimodal_jsonl(samples[:2], tmp_path, "demo", include_captions=False)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "demo_000000.png",
        "demo_000001.png",
    ]
    assert len(path.read_text().splitlines()) == 2
    assert not list(tmp_path.rglob(".*tmp*"))


def test_build_is_idempotent_and_restarts_after_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = {"n_train": 6, "n_eval": 3, "seed": 0, "text_lines": 40}
    paths = build_demo_dataset(tmp_path, **kw)
    assert set(paths) == {"train", "eval", "text", "images", "manifest"}
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["params"]["n_train"] == 6 and manifest["counts"]["eval_images"] == 3
    assert len(paths["text"].read_text().splitlines()) == 40
    eval_records = [json.loads(x) for x in paths["eval"].read_text().splitlines()]
    assert len(eval_records) == 3 and {r["task"] for r in eval_records} == {"qa"}
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    # Same parameters: nothing is rewritten.
    assert build_demo_dataset(tmp_path, **kw) == paths
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamps

    # A build interrupted before its manifest leaves no manifest, so the next call rebuilds.
    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_text_corpus", boom)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(tmp_path, **(kw | {"n_train": 4}))
    assert not paths["manifest"].exists()
    monkeypatch.undo()
    build_demo_dataset(tmp_path, **(kw | {"n_train": 4}))
    assert json.loads(paths["manifest"].read_text())["params"]["n_train"] == 4
    assert len(list((tmp_path / "images").glob("train_*.png"))) == 4

    # A missing file or a corrupt manifest also triggers a rebuild.
    paths["eval"].unlink()
    build_demo_dataset(tmp_path, **(kw | {"n_train": 4}))
    assert paths["eval"].exists()
    paths["manifest"].write_text("{not json")
    build_demo_dataset(tmp_path, **(kw | {"n_train": 4}))
    assert json.loads(paths["manifest"].read_text())["params"]["n_train"] == 4


def test_answer_normalisation_and_accuracy() -> None:
    assert normalize_answer(" Red.") == "red"
    assert normalize_answer("Three shapes") == "3"
    assert normalize_answer("yes, there is") == "yes"
    assert normalize_answer("...") == ""
    assert normalize_answer("LEFT!\n") == "left"
    assert (
        answer_accuracy(["Red.", "2", "no way", "", "circle"], ["red", "two", "no", "", "square"])
        == 0.6
    )
    with pytest.raises(ValueError):
        answer_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        answer_accuracy([], [])
    train, held_out = generate_samples(200, seed=0), generate_samples(40, seed=0, split="eval")
    assert 0.2 < majority_baseline_accuracy(train, held_out) < 0.7


def test_text_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_text_corpus(tmp_path / "a.txt", 50, seed=1)
    b = write_text_corpus(tmp_path / "b.txt", 50, seed=1)
    assert a.read_bytes() == b.read_bytes() and len(a.read_text().splitlines()) == 50
    assert a.read_bytes() != write_text_corpus(tmp_path / "c.txt", 50, seed=2).read_bytes()

    real = tmp_path / "real.txt"
    real.write_text("first real line\n\nsecond real line\n")
    mixed = write_text_corpus(tmp_path / "m.txt", 200, seed=1, real_text=real).read_text()
    assert 50 < sum(line.endswith("real line") for line in mixed.splitlines()) < 150

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="bible-kjv"):
        out = write_text_corpus(tmp_path / "k.txt", 10, seed=1, real_text="kjv")
    assert out.read_bytes() == write_text_corpus(tmp_path / "t.txt", 10, seed=1).read_bytes()


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv not installed")
def test_kjv_verses_from_the_bible_program() -> None:
    verses = kjv_verses()
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[1].endswith("moved upon the face of the waters.")
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert len(verses) == 31102


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="image_size"):
        generate_samples(1, 0, image_size=16)
    with pytest.raises(ValueError, match="max_shapes"):
        generate_samples(1, 0, max_shapes=5)
    with pytest.raises(ValueError, match="split"):
        generate_samples(1, 0, split="test")
    with pytest.raises(ValueError, match="kind"):
        generate_samples(1, 0, kinds=["colour"])
    only = generate_samples(3, 0, kinds=["count", "exists"])
    assert all(s.qa_kinds == ["count", "exists"] for s in only)


def test_photos_have_checkable_answers(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    from photos import PHOTOS, load_photos

    photos = load_photos(image_size=48)
    assert [p.name for p in photos] == list(PHOTOS)
    for p in photos:
        assert p.image.size == (48, 48) and p.image.mode == "RGB"
        assert p.qa and all(normalize_answer(a) == a for _, a in p.qa)
    path = write_multimodal_jsonl(photos[:2], tmp_path, "photos")
    assert len(path.read_text().splitlines()) == 4
    with pytest.raises(KeyError):
        load_photos(names=["dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_photos(image_size=None, names=["horse"])
