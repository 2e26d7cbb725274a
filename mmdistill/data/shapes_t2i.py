"""The shapes world for text-to-image generation, and the checker that reads an image back.

Every image (64 px by default) holds one filled shape centred in one of the four cells of the
2x2 grid, drawn by :func:`mmdistill.data.synthetic.render_scene` with that module's palette,
shapes, sizes, cell margin and shape extents (:func:`~mmdistill.data.synthetic.cell_geometry`).
There are ``5 colours x 3 shapes x 2 sizes x 4 positions = 120`` combinations, each with one
image and one caption in the shapes world's wording: ``"a large red circle in the top left."``.

**Held-out combinations.** With colour, shape, size and position numbered in the order of
``COLOURS``, ``SHAPES``, ``SIZES`` and ``POSITIONS``, a combination is held out when the sum of
its four numbers is divisible by ``HELD_OUT_EVERY`` (5): 24 of the 120. For a fixed
(colour, shape, size) at most one of the four positions satisfies this, so every such triple
stays in at least three cells of the training split, and every pair of attributes (e.g. colour
and position) still occurs in training. A held-out caption thus combines attributes that were
each seen, with each other attribute, in training, but never all four together.

**The checker** (:func:`read_objects`) looks at each cell on its own:

* foreground: pixels whose RGB distance to ``BACKGROUND`` exceeds ``FOREGROUND_DISTANCE``, half
  the distance from the background to the nearest palette colour (about 107);
* the object: the largest 4-connected foreground region, so stray pixels elsewhere in the cell
  are ignored; a cell whose region has fewer than a quarter of ``small_extent ** 2`` pixels
  (49 at 64 px; a small triangle has about 100) is empty;
* size: ``"large"`` when the longer side of the region's bounding box exceeds the midpoint of
  the small and large extents (18.5 px at 64 px, 4.5 px from either);
* the box: the bounding box of the region's rows and columns that hold at least two of its
  pixels, so a pixel stuck to the shape's side does not widen it;
* shape: a square when the fill ratio (region pixels inside the box / box area) exceeds
  ``SQUARE_FILL`` (about 0.89, midway between a square's 1 and a circle's pi/4; triangles fill
  about half); otherwise a triangle when the top third of the box holds less than
  ``TRIANGLE_BALANCE`` (0.7) times the pixels of the bottom third (an apex-up triangle: 1/5; a
  circle: 1), else a circle. The balance tells triangles from circles more safely than the fill
  ratio, which the box's trimmed rows and columns push up for small triangles;
* colour: the palette colour nearest to the per-channel median of the region's pixels;
* position: the cell.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..files import atomic_write_bytes, atomic_write_text
from .synthetic import BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, cell_geometry, render_scene

__all__ = [
    "ATTRIBUTES",
    "FOREGROUND_DISTANCE",
    "HELD_OUT_EVERY",
    "IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "POSITION_NAMES",
    "SQUARE_FILL",
    "T2I_SPLITS",
    "TRIANGLE_BALANCE",
    "ShapeAttrs",
    "all_combinations",
    "caption",
    "caption_set",
    "held_out_combinations",
    "is_held_out",
    "parse_caption",
    "read_objects",
    "render",
    "score_images",
    "write_caption_set",
]

IMAGE_SIZE = 64
# Below this the small shapes are too few pixels for the checker to tell circles from squares.
MIN_IMAGE_SIZE = 32
T2I_SPLITS: tuple[str, ...] = ("train", "heldout")
HELD_OUT_EVERY = 5
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")
POSITION_NAMES: tuple[str, ...] = tuple(f"{row} {column}" for row, column in POSITIONS)
FOREGROUND_DISTANCE = 0.5 * min(math.dist(rgb, BACKGROUND) for rgb in COLOURS.values())
SQUARE_FILL = (1.0 + math.pi / 4) / 2
TRIANGLE_BALANCE = 0.7


@dataclass(frozen=True, order=True)
class ShapeAttrs:
    """One object of the t2i world: ``colour``, ``shape``, ``size`` and ``position``
    (``"top left"``, ``"top right"``, ``"bottom left"`` or ``"bottom right"``)."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        known = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}
        for name, options in (known | {"position": POSITION_NAMES}).items():
            if getattr(self, name) not in options:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; known: {', '.join(options)}"
                )


def all_combinations() -> list[ShapeAttrs]:
    """The 120 combinations, colour-major in the order of COLOURS, SHAPES, SIZES, POSITIONS."""
    return [
        ShapeAttrs(*combo) for combo in itertools.product(COLOURS, SHAPES, SIZES, POSITION_NAMES)
    ]


def is_held_out(attrs: ShapeAttrs) -> bool:
    """Whether a combination belongs to the held-out split (the rule in the module docstring)."""
    numbers = (
        list(COLOURS).index(attrs.colour),
        SHAPES.index(attrs.shape),
        SIZES.index(attrs.size),
        POSITION_NAMES.index(attrs.position),
    )
    return sum(numbers) % HELD_OUT_EVERY == 0


def held_out_combinations() -> set[ShapeAttrs]:
    """The 24 held-out combinations."""
    return {attrs for attrs in all_combinations() if is_held_out(attrs)}


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

_OBJECT = re.compile(
    rf"an? ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"in the ({'|'.join(sorted({r for r, _ in POSITIONS}))}) "
    rf"({'|'.join(sorted({c for _, c in POSITIONS}))})"
)
_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")


def caption(attrs: ShapeAttrs | Sequence[ShapeAttrs]) -> str:
    """The caption of one object or several: ``"a large red circle in the top left."``, and
    ``"a ..., a ... and a ... ."`` for several (the wording of the shapes world)."""
    objects = [attrs] if isinstance(attrs, ShapeAttrs) else list(attrs)
    parts = [f"a {a.size} {a.colour} {a.shape} in the {a.position}" for a in objects]
    return (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + "."


def parse_caption(text: str) -> list[ShapeAttrs]:
    """The objects a caption names, in its order.

    Case, spacing and the final full stop do not matter; objects are joined by ``","``,
    ``"and"`` or ``", and"``.

    Raises:
        DataError: the caption is not in the world's wording, or names two objects in one cell.
    """
    normal = " ".join(text.lower().split()).rstrip(".").strip()
    objects = []
    for part in _SEPARATOR.split(normal):
        match = _OBJECT.fullmatch(part)
        if match is None:
            raise DataError(
                f"cannot read caption {text!r}: {part!r} is not "
                '"a <size> <colour> <shape> in the <top|bottom> <left|right>"'
            )
        size, colour, shape, row, column = match.groups()
        objects.append(ShapeAttrs(colour, shape, size, f"{row} {column}"))
    positions = [a.position for a in objects]
    if len(set(positions)) < len(positions):
        raise DataError(f"cannot read caption {text!r}: two objects in one cell")
    return objects


# --------------------------------------------------------------------------------------------
# Images and caption sets
# --------------------------------------------------------------------------------------------


def _scene_shape(attrs: ShapeAttrs, image_size: int) -> dict:
    cell, margin, free, extents = cell_geometry(image_size)
    c = POSITION_NAMES.index(attrs.position)
    extent = extents[attrs.size]
    x0 = (c % 2) * cell + margin + (free - extent) // 2
    y0 = (c // 2) * cell + margin + (free - extent) // 2
    bbox = [x0, y0, x0 + extent - 1, y0 + extent - 1]
    return {"shape": attrs.shape, "colour": attrs.colour, "bbox": bbox}


def render(attrs: ShapeAttrs | Sequence[ShapeAttrs], image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one object (or several, in different cells), each centred in its cell.

    Raises:
        ValueError: ``image_size`` is below ``MIN_IMAGE_SIZE``.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    objects = [attrs] if isinstance(attrs, ShapeAttrs) else list(attrs)
    return render_scene([_scene_shape(a, image_size) for a in objects], image_size)


def caption_set(split: str) -> list[tuple[str, ShapeAttrs]]:
    """``(caption, attrs)`` of every combination of ``split`` ("train" or "heldout"), in the
    order of :func:`all_combinations`."""
    if split not in T2I_SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(T2I_SPLITS)}")
    held = split == "heldout"
    return [(caption(a), a) for a in all_combinations() if is_held_out(a) == held]


def write_caption_set(directory: str | Path, split: str, image_size: int = IMAGE_SIZE) -> Path:
    """Write ``split``'s images and caption file; the same arguments give the same bytes.

    Images go to ``directory/images/{split}_{i:03d}.png`` and the caption file to
    ``directory/{split}.jsonl``, one ``{"image": "images/...png", "caption": "..."}`` per line
    (image paths relative to the file). Each file is written atomically, the JSONL last.

    Returns:
        The JSONL path.
    """
    out = Path(directory)
    lines = []
    for i, (text, attrs) in enumerate(caption_set(split)):
        rel = f"images/{split}_{i:03d}.png"
        buffer = io.BytesIO()
        render(attrs, image_size).save(buffer, format="PNG")
        atomic_write_bytes(out / rel, buffer.getvalue())
        lines.append(json.dumps({"image": rel, "caption": text}))
    path = out / f"{split}.jsonl"
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (all False when the mask is)."""
    h, w = mask.shape
    free = mask.tolist()
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask), strict=True):
        y, x = int(start[0]), int(start[1])
        if not free[y][x]:
            continue
        free[y][x] = False
        region, stack = [], [(y, x)]
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and free[ny][nx]:
                    free[ny][nx] = False
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def _shape_of(box: np.ndarray) -> str:
    """Square, triangle or circle from a region's trimmed box (rules in the module docstring)."""
    third = box.shape[0] // 3
    if box.sum() / box.size > SQUARE_FILL:
        return "square"
    if box[:third].sum() < TRIANGLE_BALANCE * box[box.shape[0] - third :].sum():
        return "triangle"
    return "circle"


def _read_cell(rgb: np.ndarray, position: str, extents: dict[str, int]) -> ShapeAttrs | None:
    """The object in one cell's pixels (rules in the module docstring), or None."""
    distance = np.linalg.norm(rgb.astype(np.float32) - np.array(BACKGROUND), axis=-1)
    region = _largest_region(distance > FOREGROUND_DISTANCE)
    rows = np.nonzero(region.sum(axis=1) >= 2)[0]
    cols = np.nonzero(region.sum(axis=0) >= 2)[0]
    if region.sum() < extents["small"] ** 2 / 4 or not len(rows) or not len(cols):
        return None
    shape = _shape_of(region[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    ys, xs = np.nonzero(region)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    large = extent > (extents["small"] + extents["large"]) / 2
    median = np.median(rgb[region].astype(np.float32), axis=0)
    colour = min(COLOURS, key=lambda name: math.dist(COLOURS[name], median))
    return ShapeAttrs(colour, shape, "large" if large else "small", position)


def read_objects(image: Image.Image) -> list[ShapeAttrs]:
    """The objects the checker finds in an image, in cell order (none for a blank image).

    Raises:
        ValueError: the image is not square or smaller than ``MIN_IMAGE_SIZE``.
    """
    width, height = image.size
    if width != height or width < MIN_IMAGE_SIZE:
        raise ValueError(f"need a square image of at least {MIN_IMAGE_SIZE} px, got {image.size}")
    rgb = np.asarray(image.convert("RGB"))
    cell, _, _, extents = cell_geometry(width)
    found = []
    for c, position in enumerate(POSITION_NAMES):
        y0, x0 = (c // 2) * cell, (c % 2) * cell
        obj = _read_cell(rgb[y0 : y0 + cell, x0 : x0 + cell], position, extents)
        if obj is not None:
            found.append(obj)
    return found


def score_images(captions: Sequence[str], images: Sequence[Image.Image]) -> dict:
    """Score generated images against their captions with :func:`read_objects`.

    An image is an exact match when the objects read back are exactly the caption's (no
    missing, wrong or extra object). Per attribute, each object of each caption counts once:
    right when the object found in the caption object's cell has that attribute (``position``:
    when any object is found there).

    Returns:
        ``{"n": images, "exact_match": fraction, "attribute_accuracy": {"colour": fraction,
        "shape": ..., "size": ..., "position": ...}}``.

    Raises:
        ValueError: the lists differ in length or are empty.
        DataError: a caption cannot be read (:func:`parse_caption`).
    """
    if len(captions) != len(images) or not captions:
        raise ValueError(
            f"need as many images as captions (> 0), got {len(captions)} captions and "
            f"{len(images)} images"
        )
    expected = [parse_caption(text) for text in captions]
    exact, objects = 0, 0
    right = dict.fromkeys(ATTRIBUTES, 0)
    for wanted, image in zip(expected, images, strict=True):
        found = {obj.position: obj for obj in read_objects(image)}
        exact += sorted(wanted) == sorted(found.values())
        for obj in wanted:
            objects += 1
            got = found.get(obj.position)
            for name in ATTRIBUTES:
                right[name] += got is not None and getattr(got, name) == getattr(obj, name)
    accuracy = {name: count / objects for name, count in right.items()}
    return {"n": len(images), "exact_match": exact / len(images), "attribute_accuracy": accuracy}
