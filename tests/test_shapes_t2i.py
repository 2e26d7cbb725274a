"""Tests for the t2i shapes world: combinations, the held-out rule, captions, rendering, files,
and the checker that reads an image back (exact on clean renders, robust to a little noise,
wrong where the image is wrong)."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmdistill.data.shapes_t2i import (
    POSITION_NAMES,
    ShapeAttrs,
    all_combinations,
    caption,
    caption_set,
    held_out_combinations,
    parse_caption,
    read_objects,
    render,
    score_images,
    write_caption_set,
)
from mmdistill.data.synthetic import BACKGROUND, COLOURS, SHAPES, SIZES, generate_samples
from mmdistill.errors import DataError

COMBOS = all_combinations()
RED_CIRCLE = ShapeAttrs("red", "circle", "large", "top left")


@pytest.fixture(scope="module")
def renders() -> dict[ShapeAttrs, Image.Image]:
    return {attrs: render(attrs) for attrs in COMBOS}


def _noisy(image: Image.Image, rng: np.random.Generator, blur: float = 0.0) -> Image.Image:
    """Gaussian colour noise, 20 stray pixels of random colours, optionally a blur."""
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 10, (64, 64, 3))
    for _ in range(20):
        pixels[rng.integers(64), rng.integers(64)] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Combinations and the held-out rule
# --------------------------------------------------------------------------------------------


def test_all_combinations_are_the_120_distinct_ones():
    assert len(COMBOS) == len(set(COMBOS)) == 5 * 3 * 2 * 4
    assert (
        {a.position for a in COMBOS}
        == set(POSITION_NAMES)
        == {
            "top left",
            "top right",
            "bottom left",
            "bottom right",
        }
    )
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        ShapeAttrs("pink", "circle", "large", "top left")


def test_held_out_is_one_in_five_and_deterministic():
    held = held_out_combinations()
    assert len(held) == 24
    assert held == held_out_combinations()
    assert held <= set(COMBOS)
    for name in ("colour", "shape", "size", "position"):  # every value is tested somewhere
        assert {getattr(a, name) for a in held} == {getattr(a, name) for a in COMBOS}


def test_training_split_keeps_every_triple_in_two_cells_and_every_pair():
    train = [a for a in COMBOS if a not in held_out_combinations()]
    cells = Counter((a.colour, a.shape, a.size) for a in train)
    assert len(cells) == len(COLOURS) * len(SHAPES) * len(SIZES)
    assert min(cells.values()) >= 2
    for first, second in itertools.combinations(("colour", "shape", "size", "position"), 2):
        pairs = {(getattr(a, first), getattr(a, second)) for a in train}
        assert pairs == {(getattr(a, first), getattr(a, second)) for a in COMBOS}, (first, second)


def test_caption_sets_split_the_combinations():
    train, heldout = caption_set("train"), caption_set("heldout")
    assert len(train) == 96 and len(heldout) == 24
    assert {a for _, a in heldout} == held_out_combinations()
    assert {a for _, a in train} | {a for _, a in heldout} == set(COMBOS)
    assert all(text == caption(a) for text, a in train + heldout)
    with pytest.raises(ValueError, match="unknown split 'eval'"):
        caption_set("eval")


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def test_caption_wording_and_round_trip():
    assert caption(RED_CIRCLE) == "a large red circle in the top left."
    for attrs in COMBOS:
        assert parse_caption(caption(attrs)) == [attrs]


def test_parse_caption_reads_the_multi_object_form_and_tolerates_case_and_space():
    blue = ShapeAttrs("blue", "square", "small", "bottom right")
    green = ShapeAttrs("green", "triangle", "small", "top right")
    plain = "a large red circle in the top left and a small blue square in the bottom right."
    sloppy = "  A Large RED circle in the top   left , and a small blue square in the bottom right"
    assert parse_caption(plain) == parse_caption(sloppy) == [RED_CIRCLE, blue]
    assert parse_caption(caption([RED_CIRCLE, green, blue])) == [RED_CIRCLE, green, blue]


def test_parse_caption_reads_every_caption_of_the_shapes_world():
    for sample in generate_samples(30, seed=3, image_size=64, max_shapes=4):
        objects = parse_caption(sample.caption)
        assert [(a.colour, a.shape, a.size, a.position) for a in objects] == [
            (s["colour"], s["shape"], s["size"], s["position"]) for s in sample.shapes
        ]
        assert caption(objects) == sample.caption


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle in the top left.",
        "a huge red circle in the top left.",
        "a large red circle in the middle.",
        "a large red circle in the top left or a small blue square in the top right.",
        "a large red circle in the top left and a small blue square in the top left.",
    ],
)
def test_parse_caption_names_a_caption_it_cannot_read(text):
    with pytest.raises(DataError, match="cannot read caption") as info:
        parse_caption(text)
    assert repr(text) in str(info.value)


# --------------------------------------------------------------------------------------------
# Rendering and files
# --------------------------------------------------------------------------------------------


def test_render_centres_the_shape_in_its_cell():
    pixels = np.asarray(render(ShapeAttrs("red", "square", "large", "bottom right")))
    ys, xs = np.nonzero(np.any(pixels != BACKGROUND, axis=-1))
    # cell 32..63, margin 2, free 28, large extent int(28 * 0.85) = 23: x0 = 32 + 2 + 2
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (36, 58, 36, 58)
    assert {tuple(p) for p in pixels[ys, xs]} == {COLOURS["red"]}
    small = np.asarray(render(ShapeAttrs("blue", "square", "small", "top left")))
    ys, xs = np.nonzero(np.any(small != BACKGROUND, axis=-1))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (9, 22, 9, 22)  # 2 + (28 - 14) // 2 = 9
    with pytest.raises(ValueError, match="at least 32"):
        render(RED_CIRCLE, image_size=16)


def test_write_caption_set_writes_images_and_jsonl_deterministically(tmp_path):
    path = write_caption_set(tmp_path / "a", "heldout")
    again = write_caption_set(tmp_path / "b", "heldout")
    assert path == tmp_path / "a" / "heldout.jsonl"
    assert path.read_bytes() == again.read_bytes()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["caption"] for r in records] == [text for text, _ in caption_set("heldout")]
    for record, (_, attrs) in zip(records, caption_set("heldout"), strict=True):
        image_bytes = (tmp_path / "a" / record["image"]).read_bytes()
        assert image_bytes == (tmp_path / "b" / record["image"]).read_bytes()
        with Image.open(tmp_path / "a" / record["image"]) as image:
            assert read_objects(image) == [attrs]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["heldout.jsonl", "images"]
    assert len(list((tmp_path / "a" / "images").iterdir())) == 24


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


def test_checker_reads_every_rendered_combination_exactly(renders):
    assert [read_objects(renders[a]) for a in COMBOS] == [[a] for a in COMBOS]
    score = score_images([caption(a) for a in COMBOS], [renders[a] for a in COMBOS])
    assert score["n"] == 120 and score["exact_match"] == 1.0
    assert score["attribute_accuracy"] == dict.fromkeys(("colour", "shape", "size", "position"), 1)


@pytest.mark.parametrize("image_size", [32, 56, 96])
def test_checker_reads_other_image_sizes(image_size):
    assert all(read_objects(render(a, image_size)) == [a] for a in COMBOS[::7])


def test_checker_reads_several_objects_and_a_blank_image():
    objects = [RED_CIRCLE, ShapeAttrs("yellow", "triangle", "small", "bottom left")]
    assert read_objects(render(objects)) == objects
    assert read_objects(Image.new("RGB", (64, 64), BACKGROUND)) == []
    with pytest.raises(ValueError, match="square image"):
        read_objects(Image.new("RGB", (64, 32), BACKGROUND))


def test_checker_tolerates_noise_stray_pixels_and_blur(renders):
    rng = np.random.default_rng(0)
    noisy = [_noisy(renders[a], rng) for a in COMBOS]
    assert [read_objects(image) for image in noisy] == [[a] for a in COMBOS]
    blurred = [_noisy(renders[a], rng, blur=0.7) for a in COMBOS[::3]]
    assert [read_objects(image) for image in blurred] == [[a] for a in COMBOS[::3]]
    speckled = np.asarray(Image.new("RGB", (64, 64), BACKGROUND)).copy()
    speckled[rng.integers(0, 64, 30), rng.integers(0, 64, 30)] = COLOURS["blue"]
    assert read_objects(Image.fromarray(speckled)) == []


@pytest.mark.parametrize(
    ("wrong", "attribute"),
    [
        (ShapeAttrs("blue", "circle", "large", "top left"), "colour"),
        (ShapeAttrs("red", "square", "large", "top left"), "shape"),
        (ShapeAttrs("red", "triangle", "large", "top left"), "shape"),
        (ShapeAttrs("red", "circle", "small", "top left"), "size"),
    ],
)
def test_score_counts_a_wrong_attribute_as_wrong(wrong, attribute):
    score = score_images([caption(RED_CIRCLE)], [render(wrong)])
    assert score["exact_match"] == 0.0
    expected = {name: float(name != attribute) for name in ("colour", "shape", "size", "position")}
    assert score["attribute_accuracy"] == expected


def test_score_counts_a_moved_missing_or_extra_object_as_wrong():
    moved = ShapeAttrs("red", "circle", "large", "bottom right")
    extra = [RED_CIRCLE, ShapeAttrs("green", "square", "small", "top right")]
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    captions = [caption(RED_CIRCLE)] * 3 + [caption(extra)]
    score = score_images(captions, [render(moved), blank, render(extra), render(RED_CIRCLE)])
    assert score["n"] == 4
    assert score["exact_match"] == 0.0  # moved, missing, extra, missing the second object
    # 5 caption objects; found in their cell with every attribute right: the 3rd and 4th images
    assert score["attribute_accuracy"] == dict.fromkeys(
        ("colour", "shape", "size", "position"), 0.4
    )


def test_score_rejects_mismatched_inputs_and_unreadable_captions():
    with pytest.raises(ValueError, match="as many images as captions"):
        score_images([caption(RED_CIRCLE)], [])
    with pytest.raises(ValueError, match="as many images as captions"):
        score_images([], [])
    with pytest.raises(DataError, match="cannot read caption 'a cat'"):
        score_images(["a cat"], [render(RED_CIRCLE)])
