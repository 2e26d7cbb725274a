"""Real photographs with hand-written captions and questions (optional: needs scikit-image).

Ten images bundled with scikit-image (no download needed). Captions and question/answer pairs
were written by looking at each image; answers are one lowercase word or a number, like those of
:mod:`mmdistill.data.synthetic`, so :func:`~mmdistill.data.synthetic.answer_accuracy` scores them
and :func:`~mmdistill.data.synthetic.write_multimodal_jsonl` writes them. Images are padded to a
square with their median border colour (nothing is cropped, so "facing right" or "24 coins"
stays true) and then resized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

try:
    import skimage.data as _skdata
except ImportError:  # pragma: no cover - depends on the environment
    _skdata = None

__all__ = ["PHOTOS", "PhotoSample", "load_photos", "photos_available"]


@dataclass(frozen=True)
class _Photo:
    loader: str
    caption: str
    qa: tuple[tuple[str, str], ...]


PHOTOS: dict[str, _Photo] = {
    "astronaut": _Photo(
        "astronaut",
        "a smiling woman in an orange spacesuit, with an american flag on the left and a model "
        "space shuttle on the right.",
        (
            ("What colour is the spacesuit?", "orange"),
            ("How many people are there?", "1"),
            ("Is there a flag?", "yes"),
            ("Is the person smiling?", "yes"),
        ),
    ),
    "cat": _Photo(
        "chelsea",
        "a close-up of a tabby cat's face with green eyes.",
        (
            ("What animal is this?", "cat"),
            ("What colour are its eyes?", "green"),
            ("How many eyes can you see?", "2"),
        ),
    ),
    "coffee": _Photo(
        "coffee",
        "a cup of espresso on a saucer with a small spoon, on a wooden table.",
        (
            ("What drink is in the cup?", "coffee"),
            ("Is there a spoon?", "yes"),
            ("What is the table made of?", "wood"),
        ),
    ),
    "rocket": _Photo(
        "rocket",
        "a white rocket on its launch pad at dusk, between tall metal towers with bright lights.",
        (
            ("What is in the middle of the picture?", "rocket"),
            ("What colour is the rocket?", "white"),
            ("Is the rocket flying?", "no"),
        ),
    ),
    "cameraman": _Photo(
        "camera",
        "a black-and-white photo of a man in a dark coat looking through a camera on a tripod, "
        "in a field.",
        (
            ("Is the photo in colour?", "no"),
            ("What does the man look through?", "camera"),
            ("What stands under the camera?", "tripod"),
            ("How many people are there?", "1"),
        ),
    ),
    "coins": _Photo(
        "coins",
        "a black-and-white photo of old coins laid out in four rows of six on a dark background.",
        (
            ("What objects are shown?", "coins"),
            ("How many rows of coins are there?", "4"),
            ("How many coins are in each row?", "6"),
            ("How many coins are there?", "24"),
        ),
    ),
    "horse": _Photo(
        "horse",
        "the black silhouette of a standing horse facing right, on a white background.",
        (
            ("What animal is this?", "horse"),
            ("What colour is the horse?", "black"),
            ("Which way is the horse facing?", "right"),
            ("What colour is the background?", "white"),
        ),
    ),
    "galaxies": _Photo(
        "hubble_deep_field",
        "a deep-space photo of many small galaxies and stars on a black background.",
        (
            ("What colour is the background?", "black"),
            ("Are there many objects or few?", "many"),
        ),
    ),
    "motorcycle": _Photo(
        "stereo_motorcycle",
        "a red motorcycle parked in a garage, in front of shelves with boxes.",
        (
            ("What vehicle is this?", "motorcycle"),
            ("What colour is the motorcycle?", "red"),
            ("How many wheels does it have?", "2"),
            ("Is anyone riding it?", "no"),
        ),
    ),
    "colour_wheel": _Photo(
        "colorwheel",
        "a colour wheel: a disc of every hue, white at the centre, on a black background.",
        (
            ("What shape is it?", "circle"),
            ("What colour is the centre?", "white"),
            ("What colour is at the top?", "red"),
            ("What colour is the background?", "black"),
        ),
    ),
}


@dataclass
class PhotoSample:
    """One photograph with its caption and question/answer pairs.

    Attributes:
        name: key in ``PHOTOS``.
        image: RGB image, square.
        caption: one hand-written sentence.
        qa: ``(question, answer)`` pairs; every answer is one lowercase word or a number.
        qa_kinds: ``"photo"`` for every question, parallel to ``qa``.
    """

    name: str
    image: Image.Image
    caption: str
    qa: list[tuple[str, str]]
    qa_kinds: list[str] = field(default_factory=list)


def photos_available() -> bool:
    """Whether scikit-image is installed, so :func:`load_photos` can work."""
    return _skdata is not None


def _square(array: np.ndarray) -> Image.Image:
    """Pad an image to a square with the median colour of its border."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array).convert("RGB")
    rgb = np.asarray(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def load_photos(
    image_size: int | None = 224, names: Sequence[str] | None = None
) -> list[PhotoSample]:
    """Load the bundled photographs with their captions and questions.

    Args:
        image_size: side of the square output images in pixels; ``None`` keeps the padded
            original size.
        names: keys of ``PHOTOS`` to load, in this order; ``None`` loads all of them.

    Returns:
        One :class:`PhotoSample` per name.

    Raises:
        ImportError: if scikit-image is not installed.
        KeyError: for an unknown name.
    """
    if _skdata is None:
        raise ImportError(
            "mmdistill.data.photos needs scikit-image: pip install scikit-image "
            "(or pip install 'mmdistill[real]')"
        )
    samples = []
    for name in PHOTOS if names is None else names:
        if name not in PHOTOS:
            raise KeyError(f"unknown photo {name!r}; known: {', '.join(PHOTOS)}")
        photo = PHOTOS[name]
        loader: Callable[[], object] = getattr(_skdata, photo.loader)
        array = loader()
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        image = _square(np.asarray(array))
        if image_size is not None:
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        samples.append(
            PhotoSample(
                name=name,
                image=image,
                caption=photo.caption,
                qa=list(photo.qa),
                qa_kinds=["photo"] * len(photo.qa),
            )
        )
    return samples
