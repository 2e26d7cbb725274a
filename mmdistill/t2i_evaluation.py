"""Text-to-image with a saved student: loading it with its image tokenizer, captions -> images,
and scoring generated images of the shapes world with its checker.

A student trained by an OmniMamba recipe carries its frozen image tokenizer under
``image_tokenizer/`` (:func:`mmdistill.checkpoint.save_pretrained`), so a student directory is
all generation needs. Scoring reads each image back with
:func:`mmdistill.data.shapes_t2i.read_objects` (every object's colour, shape, size and cell) and
compares with what the caption says: exact match (every object right, nothing extra) and
per-attribute accuracy.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import IMAGE_TOKENIZER_DIR
from .data.captions import read_caption_file
from .data.shapes_t2i import score_images
from .errors import CheckpointError
from .files import atomic_write_bytes
from .generation import choose_path, kept_graph_decoder
from .graph_decode import unsupported
from .image_tokenizer import load_image_tokenizer
from .model import DecoderLM, load_student
from .t2i_generation import (
    GeneratedCodes,
    Sampling,
    batch_prompts,
    check_t2i_student,
    generate_codes,
)
from .t2i_graph import ImageGraphDecoder
from .tokenizer import Tokenizer, load_tokenizer


@dataclass
class T2IStudent:
    """A student that generates images, with its text and image tokenizers."""

    model: DecoderLM
    text: Tokenizer
    images: object
    max_caption_tokens: int = 68

    def caption_ids(self, caption: str) -> list[int]:
        return self.text.encode(caption, add_special_tokens=False)[: self.max_caption_tokens]


def load_t2i_student(directory: str | Path, dtype=None, device="cpu") -> T2IStudent:
    """Load a student with an image vocabulary and the image tokenizer saved beside it.

    Raises:
        CheckpointError: not a student, no image vocabulary, or no image tokenizer.
    """
    directory = Path(directory)
    model = load_student(directory, dtype=dtype, device=device)
    check_t2i_student(model)
    if not (directory / IMAGE_TOKENIZER_DIR).is_dir():
        raise CheckpointError(
            f"{directory} has no {IMAGE_TOKENIZER_DIR}/ to turn codes into images; save the "
            "student with save_pretrained(..., image_tokenizer=...)"
        )
    images = load_image_tokenizer(directory / IMAGE_TOKENIZER_DIR, device=device)
    return T2IStudent(model, load_tokenizer(directory), images)


def image_decode_path(model: DecoderLM, captions: list[list[int]], sampling: Sampling) -> str:
    """``graph`` or ``eager``: the path ``sampling.decode`` takes for ``captions``. The
    captured step is greedy and unguided; through attention layers its prompts must not be
    padded (captions of equal token length).

    Raises:
        ValueError: an unknown path, or ``graph`` for a request it cannot decode.
    """
    reason = None
    if sampling.temperature > 0 or sampling.cfg_scale > 0:
        reason = "sampling or guidance (the t2i step is greedy and unguided)"
    reason = reason or unsupported(model, padded=len({len(c) for c in captions}) > 1)
    return choose_path(sampling.decode, reason, model.device.type == "cuda")


@torch.no_grad()
def image_codes(
    model: DecoderLM, captions: list[list[int]], sampling: Sampling | None = None
) -> GeneratedCodes:
    """One image's codes per caption: :func:`~mmdistill.t2i_generation.generate_codes`, or the
    step replayed from a CUDA graph (:class:`~mmdistill.t2i_graph.ImageGraphDecoder`; off CUDA
    the same step run eagerly) where :func:`image_decode_path` says ``graph``. The decoder is
    kept on the model (:func:`~mmdistill.generation.kept_graph_decoder`), so the batches of a
    caption file reuse one capture."""
    sampling = sampling or Sampling()
    check_t2i_student(model)
    if image_decode_path(model, captions, sampling) == "eager":
        return generate_codes(model, captions, sampling)
    model.use_task("t2i")  # before the lookup: kept decoders are keyed by task
    ids, mask = batch_prompts(model, captions, guided=False)
    needed = ids.shape[1] + model.image_vocab.spec.codes_per_image
    decoder = kept_graph_decoder(model, len(captions), needed, kind=ImageGraphDecoder)
    return decoder.generate(decoder.prefill(ids, mask))


def generate_images(
    student: T2IStudent,
    captions: list[str],
    sampling: Sampling | None = None,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Image.Image], int]:
    """One image per caption, ``batch_size`` captions per decode; the images and how many text
    tokens a shared vocabulary emitted in image positions."""
    images, crossed = [], 0
    for start in range(0, len(captions), batch_size):
        chunk = [student.caption_ids(c) for c in captions[start : start + batch_size]]
        out = image_codes(student.model, chunk, sampling)
        images.extend(student.images.decode_images(out.codes))
        crossed += out.crossed
        if progress is not None:
            progress(len(chunk))
    return images, crossed


def evaluate_t2i(
    student: T2IStudent,
    caption_file: str | Path,
    sampling: Sampling | None = None,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict, list[Image.Image], list[str]]:
    """Generate an image per caption of ``caption_file`` and score them with the shapes checker.

    Returns:
        ``({"exact_match", "attribute_accuracy": {...}, "n", "crossed"}, images, captions)``.
    """
    captions = [r.caption for r in read_caption_file(caption_file)]
    images, crossed = generate_images(student, captions, sampling, batch_size, progress)
    scores = score_images(captions, images)
    return {**scores, "crossed": crossed}, images, captions


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as a PNG atomically (a crash leaves no half-written file)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def image_grid(images: list[Image.Image], columns: int = 8, scale: int = 2) -> Image.Image:
    """The images side by side, ``columns`` per row, each enlarged ``scale`` times."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w * scale, rows * h * scale), (255, 255, 255))
    for i, image in enumerate(images):
        tile = image.resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, ((i % columns) * w * scale, (i // columns) * h * scale))
    return grid
