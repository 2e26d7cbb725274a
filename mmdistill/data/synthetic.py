"""Procedural multimodal data whose answers are known: shapes on a plain background, with text.

Every image is a 2x2 grid of cells on a plain background; each of 1-4 cells holds one filled
shape (circle, square or triangle) in one palette colour and one of two sizes, at a random offset
inside its cell. Shapes are drawn without anti-aliasing and keep a margin from their cell's border,
so every pixel is either the background or exactly one palette colour, and shapes never touch:
the image can be checked against its stated attributes with plain numpy.

From the attributes come a caption and question/answer turns whose answers are one word or one
number, so answer accuracy is an exact match (:func:`answer_accuracy`).

**Determinism and splits.** Sample ``i`` of ``(seed, split)`` is drawn from its own
``numpy.random.SeedSequence([seed, split_id, i])``: the same arguments give byte-identical images
and texts, ``generate_samples(n)`` is a prefix of ``generate_samples(n + m)``, and different seeds
give independent streams. A scene (every shape's attributes and pixel box) fully determines its
image, and the SHA-256 of the scene decides which split may use it (one scene in
``EVAL_EVERY`` belongs to ``"eval"``, the rest to ``"train"``; a draw for the other split is
rejected and redrawn). So no ``"eval"`` image can equal a ``"train"`` image, whatever seeds the two
sets were drawn with. Scenes with the same attributes but other offsets can occur in both splits
(there are only 120 one-shape attribute combinations): held out means unseen images, not unseen
attribute combinations.

Typical use::

    paths = build_demo_dataset("runs/demo-data", n_train=2000, n_eval=200, seed=0)
    # paths["train"], paths["eval"]: LLaVA/InternVL-style JSONL; paths["text"]: a text corpus
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image, ImageDraw

from ..chat import IMAGE_PLACEHOLDER
from ..errors import DataError
from ..files import atomic_write_bytes
from .kjv import read_verses

__all__ = [
    "BACKGROUND",
    "CAPTION_PROMPT",
    "CellGeometry",
    "COLOURS",
    "DATA_VERSION",
    "EVAL_EVERY",
    "POSITIONS",
    "QA_KINDS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "MultimodalSample",
    "ShapeSample",
    "answer_accuracy",
    "build_demo_dataset",
    "cell_geometry",
    "generate_samples",
    "kjv_verses",
    "majority_baseline_accuracy",
    "normalize_answer",
    "render_scene",
    "scene_split",
    "write_multimodal_jsonl",
    "write_text_corpus",
]

# Bump when the generator's output changes, so cached datasets are rebuilt.
DATA_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 180),
}
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Cells in reading order: (row, column) of the 2x2 grid.
POSITIONS: tuple[tuple[str, str], ...] = (
    ("top", "left"),
    ("top", "right"),
    ("bottom", "left"),
    ("bottom", "right"),
)
SPLITS: dict[str, int] = {"train": 0, "eval": 1}
EVAL_EVERY = 8
QA_KINDS: tuple[str, ...] = (
    "count",  # How many shapes are there? -> "3"
    "count_shape",  # How many circles are there? -> "0".."4"
    "count_colour",  # How many red shapes are there? -> "0".."4"
    "colour_of_shape",  # What colour is the circle? (only if exactly one circle) -> "red"
    "colour_at",  # What colour is the shape in the top left? -> "red"
    "shape_at",  # What shape is on the left? / in the top left? (unambiguous only) -> "square"
    "exists",  # Is there a blue triangle? -> "yes" / "no" (balanced)
    "size",  # What size is the red circle? (only if unique) -> "small" / "large"
    "side",  # Is the red circle on the left or the right? (only if unique) -> "left"
)
CAPTION_PROMPT = "Describe the image."

_MARGIN = 2  # pixels kept free inside each cell border, so shapes in adjacent cells never touch
_LARGE, _SMALL = 0.85, 0.5  # shape extent as a fraction of the free space in a cell
_MIN_IMAGE_SIZE = 32
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}
_CORNERS = {"circle": 0, "triangle": 3, "square": 4}


class MultimodalSample(Protocol):
    """What :func:`write_multimodal_jsonl` needs from a sample (shapes or photographs)."""

    image: Image.Image
    caption: str
    qa: list[tuple[str, str]]
    qa_kinds: list[str]


@dataclass
class ShapeSample:
    """One generated image with its ground truth.

    Attributes:
        image: RGB image, ``image_size x image_size`` pixels.
        shapes: one dict per shape, in reading order of their cells, with keys ``shape``,
            ``colour``, ``size``, ``row`` ("top"/"bottom"), ``column`` ("left"/"right"),
            ``position`` (e.g. "top left"), ``bbox`` (``[x0, y0, x1, y1]``, inclusive pixel
            box) and ``center`` (``[x, y]``, a pixel inside the shape: the centroid).
        caption: one sentence naming every shape, e.g.
            ``"a large red circle in the top left and a small blue square in the bottom right."``
        qa: ``(question, answer)`` pairs; every answer is one lowercase word or a number.
        qa_kinds: the kind of each question (an entry of ``QA_KINDS``), parallel to ``qa``.
        scene_id: first 16 hex digits of the scene's SHA-256 (identical scenes, identical ids).
    """

    image: Image.Image
    shapes: list[dict[str, Any]]
    caption: str
    qa: list[tuple[str, str]]
    qa_kinds: list[str] = field(default_factory=list)
    scene_id: str = ""


# --------------------------------------------------------------------------------------------
# Scenes and rendering
# --------------------------------------------------------------------------------------------


class CellGeometry(NamedTuple):
    """Pixel layout of one cell of the 2x2 grid (see :func:`cell_geometry`)."""

    cell: int  # side of a cell
    margin: int  # pixels kept free inside the cell's border
    free: int  # side of the space a shape may occupy: cell - 2 * margin
    extents: dict[str, int]  # side of a shape's bounding box, by size ("small", "large")


def cell_geometry(image_size: int) -> CellGeometry:
    """The cell size, margin, free space and shape extents of an ``image_size`` image."""
    cell = image_size // 2
    free = cell - 2 * _MARGIN
    return CellGeometry(
        cell, _MARGIN, free, {"large": int(free * _LARGE), "small": int(free * _SMALL)}
    )


def _check_geometry(image_size: int, min_shapes: int, max_shapes: int) -> None:
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= min_shapes <= max_shapes <= len(POSITIONS):
        raise ValueError(
            f"need 1 <= min_shapes <= max_shapes <= {len(POSITIONS)}, "
            f"got min_shapes={min_shapes}, max_shapes={max_shapes}"
        )


def _sample_scene(
    rng: np.random.Generator, image_size: int, min_shapes: int, max_shapes: int
) -> list[dict[str, Any]]:
    cell, margin, free, extents = cell_geometry(image_size)
    k = int(rng.integers(min_shapes, max_shapes + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=k, replace=False))
    shapes = []
    for c in cells:
        row, column = POSITIONS[c]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        extent = extents[size]
        x0 = (c % 2) * cell + margin + int(rng.integers(free - extent + 1))
        y0 = (c // 2) * cell + margin + int(rng.integers(free - extent + 1))
        x1, y1 = x0 + extent - 1, y0 + extent - 1
        cy = y0 + round(2 * (y1 - y0) / 3) if shape == "triangle" else (y0 + y1) // 2
        shapes.append(
            {
                "shape": shape,
                "colour": colour,
                "size": size,
                "row": row,
                "column": column,
                "position": f"{row} {column}",
                "bbox": [x0, y0, x1, y1],
                "center": [(x0 + x1) // 2, cy],
            }
        )
    return shapes


def _scene_digest(shapes: Sequence[dict[str, Any]], image_size: int) -> str:
    blob = json.dumps({"image_size": image_size, "shapes": list(shapes)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def scene_split(shapes: Sequence[dict[str, Any]], image_size: int) -> str:
    """The split a scene belongs to, from its SHA-256 (one scene in ``EVAL_EVERY`` is "eval").

    Args:
        shapes: the scene's shape dicts, as in :attr:`ShapeSample.shapes`.
        image_size: side of the image in pixels.

    Returns:
        ``"eval"`` or ``"train"``.
    """
    return "eval" if int(_scene_digest(shapes, image_size)[:8], 16) % EVAL_EVERY == 0 else "train"


def render_scene(shapes: Sequence[dict[str, Any]], image_size: int) -> Image.Image:
    """Draw a scene: filled shapes, no anti-aliasing, on the plain ``BACKGROUND``.

    Args:
        shapes: shape dicts with ``shape``, ``colour`` and ``bbox`` (inclusive pixel box).
        image_size: side of the square image in pixels.

    Returns:
        RGB image of ``image_size x image_size`` pixels.
    """
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0, x1, y1 = s["bbox"]
        fill = COLOURS[s["colour"]]
        if s["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif s["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif s["shape"] == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {s['shape']!r}; known: {', '.join(SHAPES)}")
    return image


# --------------------------------------------------------------------------------------------
# Text: captions and questions
# --------------------------------------------------------------------------------------------


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(shapes: Sequence[dict[str, Any]]) -> str:
    return (
        _join([f"a {s['size']} {s['colour']} {s['shape']} in the {s['position']}" for s in shapes])
        + "."
    )


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _questions(
    rng: np.random.Generator, shapes: Sequence[dict[str, Any]], kinds: Sequence[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """One question per requested kind that has an unambiguous answer for this scene."""
    by_shape = Counter(s["shape"] for s in shapes)
    by_colour = Counter(s["colour"] for s in shapes)
    by_pair = Counter((s["colour"], s["shape"]) for s in shapes)
    unique = [s for s in shapes if by_pair[(s["colour"], s["shape"])] == 1]
    qa: list[tuple[str, str]] = []
    out_kinds: list[str] = []

    def add(kind: str, question: str, answer: str) -> None:
        qa.append((question, answer))
        out_kinds.append(kind)

    for kind in kinds:
        if kind == "count":
            add(kind, "How many shapes are there?", str(len(shapes)))
        elif kind == "count_shape":
            shape = _pick(rng, SHAPES)
            add(kind, f"How many {shape}s are there?", str(by_shape[shape]))
        elif kind == "count_colour":
            colour = _pick(rng, list(COLOURS))
            add(kind, f"How many {colour} shapes are there?", str(by_colour[colour]))
        elif kind == "colour_of_shape":
            singles = [s for s in shapes if by_shape[s["shape"]] == 1]
            if singles:
                s = _pick(rng, singles)
                add(kind, f"What colour is the {s['shape']}?", s["colour"])
        elif kind == "colour_at":
            s = _pick(rng, shapes)
            add(kind, f"What colour is the shape in the {s['position']}?", s["colour"])
        elif kind == "shape_at":
            places: list[tuple[str, dict[str, Any]]] = [
                (f"in the {s['position']}", s) for s in shapes
            ]
            for key, value, phrase in (
                ("column", "left", "on the left"),
                ("column", "right", "on the right"),
                ("row", "top", "at the top"),
                ("row", "bottom", "at the bottom"),
            ):
                hits = [s for s in shapes if s[key] == value]
                if len(hits) == 1:
                    places.append((phrase, hits[0]))
            phrase, s = _pick(rng, places)
            add(kind, f"What shape is {phrase}?", s["shape"])
        elif kind == "exists":
            present = sorted(by_pair)
            absent = [(c, sh) for c in COLOURS for sh in SHAPES if (c, sh) not in by_pair]
            yes = bool(rng.integers(2)) or not absent
            colour, shape = _pick(rng, present if yes else absent)
            add(kind, f"Is there a {colour} {shape}?", "yes" if yes else "no")
        elif kind == "size":
            if unique:
                s = _pick(rng, unique)
                add(kind, f"What size is the {s['colour']} {s['shape']}?", s["size"])
        elif kind == "side":
            if unique:
                s = _pick(rng, unique)
                question = f"Is the {s['colour']} {s['shape']} on the left or the right?"
                add(kind, question, s["column"])
        else:
            raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(QA_KINDS)}")
    return qa, out_kinds


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return SPLITS[split]


def _draw_scene(
    rng: np.random.Generator, split: str, image_size: int, min_shapes: int, max_shapes: int
) -> tuple[list[dict[str, Any]], str]:
    """Draw scenes until one belongs to ``split``; return it and its digest."""
    while True:
        shapes = _sample_scene(rng, image_size, min_shapes, max_shapes)
        if scene_split(shapes, image_size) == split:
            return shapes, _scene_digest(shapes, image_size)


def generate_samples(
    n: int,
    seed: int,
    image_size: int = 56,
    max_shapes: int = 3,
    *,
    split: str = "train",
    min_shapes: int = 1,
    kinds: Sequence[str] = QA_KINDS,
) -> list[ShapeSample]:
    """Generate ``n`` images with known content, their captions and question/answer turns.

    Args:
        n: number of samples.
        seed: random seed. Sample ``i`` depends only on ``(seed, split, i)`` and the geometry
            arguments, so a longer list extends a shorter one.
        image_size: side of the square images in pixels (at least 32; 56 gives a 4x4 grid of
            14-pixel patches).
        max_shapes: most shapes per image (at most 4, one per cell of the 2x2 grid).
        split: ``"train"`` or ``"eval"``. A scene's hash decides its split, so the two splits
            never share an image (see the module docstring).
        min_shapes: fewest shapes per image.
        kinds: question kinds to ask, in this order (entries of ``QA_KINDS``); each kind gives
            at most one question per image, and kinds without an unambiguous answer for an
            image are skipped for it.

    Returns:
        ``n`` samples; ``sample.image`` is ``image_size x image_size`` RGB.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    _check_geometry(image_size, min_shapes, max_shapes)
    split_id = _split_id(split)
    samples = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, i]))
        shapes, digest = _draw_scene(rng, split, image_size, min_shapes, max_shapes)
        qa, qa_kinds = _questions(rng, shapes, kinds)
        samples.append(
            ShapeSample(
                image=render_scene(shapes, image_size),
                shapes=shapes,
                caption=_caption(shapes),
                qa=qa,
                qa_kinds=qa_kinds,
                scene_id=digest[:16],
            )
        )
    return samples


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Normalise a short answer for exact-match scoring.

    Lowercase; turn every character that is neither a letter, a digit, an underscore nor
    whitespace into a space; keep the first whitespace-separated word; map number words
    "zero".."ten" to digits. ``" Red."`` -> ``"red"``, ``"Three shapes"`` -> ``"3"``,
    ``"yes, there is"`` -> ``"yes"``, ``""`` -> ``""``.

    Args:
        text: a predicted or reference answer.

    Returns:
        The normalised answer (empty if ``text`` has no word).
    """
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if not words:
        return ""
    return _NUMBER_WORDS.get(words[0], words[0])


def answer_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after :func:`normalize_answer`.

    An empty normalised prediction never counts as correct.

    Args:
        predictions: model answers, one per question.
        references: ground-truth answers, parallel to ``predictions``.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score against")
    hits = 0
    for p, r in zip(predictions, references, strict=True):
        norm = normalize_answer(p)
        hits += bool(norm) and norm == normalize_answer(r)
    return hits / len(references)


def majority_baseline_accuracy(
    train: Sequence[MultimodalSample], eval_samples: Sequence[MultimodalSample]
) -> float:
    """Accuracy of answering from the question text alone, the floor a model must beat.

    Each eval question gets the answer most often given to the same question text in
    ``train`` (ties: the answer seen first); questions never seen in ``train`` get the most
    common answer of their kind, else the most common answer overall.

    Args:
        train: samples whose answers are counted.
        eval_samples: samples to answer.

    Returns:
        Accuracy in ``[0, 1]`` under :func:`answer_accuracy`.
    """
    by_question: dict[str, Counter[str]] = {}
    by_kind: dict[str, Counter[str]] = {}
    overall: Counter[str] = Counter()
    for s in train:
        for (q, a), kind in zip(s.qa, s.qa_kinds, strict=True):
            by_question.setdefault(q, Counter())[a] += 1
            by_kind.setdefault(kind, Counter())[a] += 1
            overall[a] += 1
    predictions, references = [], []
    fallback = overall.most_common(1)[0][0] if overall else ""
    for s in eval_samples:
        for (q, a), kind in zip(s.qa, s.qa_kinds, strict=True):
            table = by_question.get(q) or by_kind.get(kind)
            predictions.append(table.most_common(1)[0][0] if table else fallback)
            references.append(a)
    return answer_accuracy(predictions, references)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_multimodal_jsonl(
    samples: Sequence[MultimodalSample],
    out_dir: str | Path,
    name: str,
    *,
    include_captions: bool = True,
) -> Path:
    """Write images and a LLaVA/InternVL-style conversation JSONL.

    Images go to ``out_dir/images/{name}_{i:06d}.png`` (stale images of the same name with a
    higher index are removed); the JSONL goes to ``out_dir/{name}.jsonl``, one record per line::

        {"id": "train-000000-qa", "task": "qa", "image": "images/train_000000.png",
         "conversations": [{"from": "human", "value": "<image>\\nHow many shapes are there?"},
                           {"from": "gpt", "value": "3"}, ...],
         "qa_kinds": ["count", ...]}

    with ``<image>`` in the first human turn only and image paths relative to the JSONL's
    directory. With ``include_captions``, each sample also gets a ``"task": "caption"`` record
    (``"Describe the image."`` -> caption) right after its QA record. Every file is written to
    a temporary name and renamed.

    Args:
        samples: samples with ``image``, ``caption``, ``qa`` and ``qa_kinds``.
        out_dir: output directory (created if missing).
        name: file stem, e.g. ``"train"``; letters, digits, ``-`` and ``_`` only.
        include_captions: also write a caption conversation per sample.

    Returns:
        Path of the JSONL file.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"name must use letters, digits, '-' and '_' only, got {name!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(samples):
        rel = f"images/{name}_{i:06d}.png"
        atomic_write_bytes(out / rel, _png_bytes(s.image))
        conversations = []
        for j, (q, a) in enumerate(s.qa):
            prompt = f"{IMAGE_PLACEHOLDER}\n{q}" if j == 0 else q
            conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": a}]
        if conversations:
            record = {"id": f"{name}-{i:06d}-qa", "task": "qa", "image": rel}
            record |= {"conversations": conversations, "qa_kinds": list(s.qa_kinds)}
            lines.append(json.dumps(record, ensure_ascii=False))
        if include_captions:
            conversations = [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{CAPTION_PROMPT}"},
                {"from": "gpt", "value": s.caption},
            ]
            record = {"id": f"{name}-{i:06d}-caption", "task": "caption", "image": rel}
            lines.append(json.dumps(record | {"conversations": conversations}, ensure_ascii=False))
    for stale in (out / "images").glob(f"{name}_*.png"):
        index = stale.stem[len(name) + 1 :]
        if index.isdigit() and int(index) >= len(samples):
            stale.unlink()
    path = out / f"{name}.jsonl"
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())
    return path


def kjv_verses(source: str | Path = "bible") -> list[str]:
    """Verses of the King James Bible from the Debian ``bible`` program or a text file.

    Args:
        source: ``"bible"`` reads every verse through :func:`mmdistill.data.kjv.read_verses`;
            any other value is a UTF-8 text file whose non-empty lines are returned as they are.

    Returns:
        One string per verse or line.

    Raises:
        DataError: if the ``bible`` program is missing or fails.
        FileNotFoundError: if the text file is missing.
    """
    if str(source) != "bible":
        text = Path(source).read_text(encoding="utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [verse.text for verse in read_verses()]


def _template_line(rng: np.random.Generator, image_size: int) -> str:
    """One templated sentence about shapes, colours or counts (train-split scenes only)."""
    kind = int(rng.integers(5))
    if kind == 0:
        shapes, _ = _draw_scene(rng, "train", image_size, 1, len(POSITIONS))
        return "The picture shows " + _caption(shapes)
    if kind == 1:
        shapes, _ = _draw_scene(rng, "train", image_size, 1, len(POSITIONS))
        qa, _ = _questions(rng, shapes, [_pick(rng, QA_KINDS[:3] + ("colour_at", "exists"))])
        q, a = qa[0]
        return f"{_caption(shapes).capitalize()} {q} {a}."
    if kind == 2:
        shape = _pick(rng, SHAPES)
        corners = _CORNERS[shape]
        return f"A {shape} has {corners if corners else 'no'} corner{'s' if corners != 1 else ''}."
    if kind == 3:
        a, b = int(rng.integers(5)), int(rng.integers(5))
        return f"{a} plus {b} is {a + b}."
    count = int(rng.integers(1, 5))
    colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
    return f"There {'is' if count == 1 else 'are'} {count} {colour} {shape}{'s' * (count > 1)}."


def write_text_corpus(
    path: str | Path,
    n_lines: int,
    seed: int,
    *,
    real_text: str | Path | None = None,
    real_fraction: float = 0.5,
    image_size: int = 56,
) -> Path:
    """Write a plain-text corpus, one sentence per line.

    Lines are templated sentences about shapes, colours and counts (scene captions with a
    question and its answer, corner facts, small sums; scenes are drawn from the ``"train"``
    split only), mixed with real text when ``real_text`` is given.

    Args:
        path: output file (written to a temporary name and renamed).
        n_lines: number of lines.
        seed: random seed; the same arguments give the same file.
        real_text: ``None`` for templates only; ``"kjv"`` for King James verses from the
            ``bible`` program if it is installed (if not, a warning, and templates only); or a
            text file whose non-empty lines are sampled.
        real_fraction: share of lines taken from ``real_text``, in order from a random start.
        image_size: image size of the scenes the captions describe.

    Returns:
        ``Path(path)``.
    """
    if n_lines < 0:
        raise ValueError(f"n_lines must be non-negative, got {n_lines}")
    if not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"real_fraction must be in [0, 1], got {real_fraction}")
    real: list[str] = []
    if real_text is not None:
        try:
            real = kjv_verses("bible" if str(real_text) == "kjv" else real_text)
        except DataError as err:
            if str(real_text) != "kjv":
                raise
            warnings.warn(f"{err}; writing templated text only", stacklevel=2)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    cursor = int(rng.integers(len(real))) if real else 0
    lines = []
    for _ in range(n_lines):
        if real and rng.random() < real_fraction:
            lines.append(real[cursor % len(real)])
            cursor += 1
        else:
            lines.append(_template_line(rng, image_size))
    out = Path(path)
    atomic_write_bytes(out, "".join(line + "\n" for line in lines).encode())
    return out


def build_demo_dataset(
    out_dir: str | Path,
    n_train: int,
    n_eval: int,
    seed: int,
    *,
    image_size: int = 56,
    max_shapes: int = 3,
    text_lines: int = 2000,
    real_text: str | Path | None = None,
) -> dict[str, Path]:
    """Write the demo's train/eval JSONL, images and text corpus; skip if already complete.

    Layout: ``train.jsonl`` (QA and caption records), ``eval.jsonl`` (QA records of the
    held-out ``"eval"`` split), ``images/``, ``text.txt`` and ``manifest.json``. The manifest
    is written last and records the parameters; a directory whose manifest has the same
    parameters and whose files all exist is returned as it is.

    Args:
        out_dir: output directory.
        n_train: training images (split ``"train"``).
        n_eval: held-out images (split ``"eval"``; never equal to a training image).
        seed: random seed for images and text.
        image_size: side of the images in pixels.
        max_shapes: most shapes per image (1-4).
        text_lines: lines of the text corpus.
        real_text: passed to :func:`write_text_corpus`. With ``"kjv"`` the corpus depends on
            whether the ``bible`` program is installed, which the manifest does not record.

    Returns:
        Paths keyed ``"train"``, ``"eval"``, ``"text"``, ``"images"`` and ``"manifest"``.
    """
    out = Path(out_dir)
    files = {"train": "train.jsonl", "eval": "eval.jsonl", "text": "text.txt", "images": "images"}
    params = {
        "version": DATA_VERSION,
        "n_train": n_train,
        "n_eval": n_eval,
        "seed": seed,
        "image_size": image_size,
        "max_shapes": max_shapes,
        "text_lines": text_lines,
        "real_text": None if real_text is None else str(real_text),
    }
    paths = {key: out / rel for key, rel in files.items()} | {"manifest": out / "manifest.json"}
    manifest_path = paths["manifest"]
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        if old.get("params") == params and all(p.exists() for p in paths.values()):
            return paths
        manifest_path.unlink()  # from here until the new manifest lands, the build is incomplete
    _check_geometry(image_size, 1, max_shapes)
    train = generate_samples(n_train, seed, image_size, max_shapes, split="train")
    held_out = generate_samples(n_eval, seed, image_size, max_shapes, split="eval")
    write_multimodal_jsonl(train, out, "train", include_captions=True)
    write_multimodal_jsonl(held_out, out, "eval", include_captions=False)
    write_text_corpus(paths["text"], text_lines, seed, real_text=real_text, image_size=image_size)
    manifest = {
        "params": params,
        "files": files,
        "counts": {
            "train_images": n_train,
            "eval_images": n_eval,
            "train_questions": sum(len(s.qa) for s in train),
            "eval_questions": sum(len(s.qa) for s in held_out),
        },
        "majority_baseline_accuracy": (
            majority_baseline_accuracy(train, held_out) if n_train and n_eval else None
        ),
    }
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return paths
