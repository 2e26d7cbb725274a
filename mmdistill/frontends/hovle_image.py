"""Image preprocessing and prompt construction for HoVLE (InternVL conventions).

* :func:`load_image` reproduces InternVL/HoVLE's ``load_image``: RGB conversion, dynamic
  aspect-ratio tiling into ``input_size`` squares (plus a thumbnail), bicubic resize, scaling to
  [0, 1] and ImageNet normalisation. It needs only PIL and torch (no torchvision): on PIL images
  ``torchvision.transforms.Resize`` *is* ``PIL.Image.resize`` and ``ToTensor``/``Normalize`` are
  the float32 arithmetic done here.
* :func:`expand_image_placeholders` turns each ``<image>`` into
  ``<img>`` + ``<IMG_CONTEXT>`` x (num_image_token x tiles) + ``</img>``, as ``chat()`` does.
* :func:`render_chat` renders a conversation with HoVLE's chat template (``internlm2-chat``).

Sources and the details that could not be verified are listed in ``docs/hovle_format.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..chat import IMAGE_PLACEHOLDER

__all__ = [
    "CHAT_TEMPLATES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_CONTEXT_TOKEN",
    "IMG_END_TOKEN",
    "IMG_START_TOKEN",
    "IMAGE_PLACEHOLDER",
    "ChatTemplate",
    "build_chat_prompt",
    "candidate_grids",
    "dynamic_preprocess",
    "expand_image_placeholders",
    "find_closest_aspect_ratio",
    "image_to_tensor",
    "load_image",
    "open_image",
    "render_chat",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

ImageInput = str | os.PathLike[str] | Image.Image


def open_image(image: ImageInput) -> Image.Image:
    """Open an image file (or take a PIL image) and return it in RGB.

    Args:
        image: A path or a PIL image.

    Returns:
        An RGB PIL image (fully decoded).

    Raises:
        FileNotFoundError: If the path does not exist (the message names it).
        ValueError: If the file cannot be decoded as an image (the message names it).
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from err


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Tile grids ``(columns, rows)`` with ``min_num <= columns*rows <= max_num``.

    Sorted by tile count. Ties keep the iteration order of the Python set InternVL builds them
    in (deterministic for small integer tuples), because :func:`find_closest_aspect_ratio`'s tie
    rule depends on the order.

    Args:
        min_num: Fewest tiles (``min_dynamic_patch``).
        max_num: Most tiles (``max_dynamic_patch``).

    Returns:
        The candidate grids.

    Raises:
        ValueError: If ``1 <= min_num <= max_num`` does not hold.
    """
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num; got min_num={min_num}, max_num={max_num}")
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_closest_aspect_ratio(
    aspect_ratio: float,
    grids: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """Pick the grid whose aspect ratio is closest to the image's (InternVL's rule).

    On an exact tie with the best so far, a later grid wins only when the image area exceeds
    half of that grid's pixel area (``0.5 * image_size**2 * columns * rows``).

    Args:
        aspect_ratio: ``width / height`` of the image.
        grids: Candidates from :func:`candidate_grids` (order matters for ties).
        width: Image width in pixels.
        height: Image height in pixels.
        image_size: Tile side in pixels.

    Returns:
        The chosen ``(columns, rows)``.
    """
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """Split an image into ``image_size`` tiles on the best-fitting grid (InternVL tiling).

    The image is resized (bicubic) to ``(columns*image_size, rows*image_size)`` and cut
    row-major; if ``use_thumbnail`` and there is more than one tile, the whole image resized to
    ``image_size`` square is appended last.

    Args:
        image: RGB PIL image.
        min_num: Fewest tiles.
        max_num: Most tiles (thumbnail not counted).
        image_size: Tile side in pixels.
        use_thumbnail: Append the thumbnail tile.

    Returns:
        The tiles as PIL images, each ``image_size`` square.
    """
    width, height = image.size
    cols, rows = find_closest_aspect_ratio(
        width / height, candidate_grids(min_num, max_num), width, height, image_size
    )
    resized = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def image_to_tensor(
    image: Image.Image,
    input_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """InternVL's ``build_transform`` on one image: bicubic resize, [0, 1], normalise.

    Args:
        image: PIL image (converted to RGB if needed).
        input_size: Output side in pixels (a no-op resize when the image already has it).
        mean: Per-channel mean.
        std: Per-channel standard deviation.

    Returns:
        FloatTensor ``[3, input_size, input_size]``.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((input_size, input_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    x = pixels.permute(2, 0, 1).to(torch.float32).div(255)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub(m).div(s)


def load_image(
    image: ImageInput,
    input_size: int = 448,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    dynamic: bool = True,
) -> Tensor:
    """Load and preprocess one image the way HoVLE's ``load_image`` does.

    Args:
        image: A path or a PIL image.
        input_size: Tile side (``force_image_size``, 448 for HoVLE).
        max_num: Most tiles (``max_dynamic_patch``).
        min_num: Fewest tiles (``min_dynamic_patch``).
        use_thumbnail: Append a whole-image thumbnail when there are several tiles.
        dynamic: Tile (``dynamic_image_size``); when false the whole image becomes one tile.

    Returns:
        FloatTensor ``[tiles, 3, input_size, input_size]``.

    Raises:
        FileNotFoundError: If the path does not exist.
        ValueError: If the file is not a readable image or the tile limits are invalid.
    """
    rgb = open_image(image)
    if dynamic:
        tiles = dynamic_preprocess(rgb, min_num, max_num, input_size, use_thumbnail)
    else:
        tiles = [rgb]
    return torch.stack([image_to_tensor(tile, input_size) for tile in tiles])


def expand_image_placeholders(
    prompt: str,
    num_patches_list: Sequence[int],
    num_image_token: int,
) -> str:
    """Replace each ``<image>`` by ``<img>`` + ``<IMG_CONTEXT>`` * (T * tiles) + ``</img>``.

    Placeholders are replaced left to right, the i-th with image i's tile count, exactly as
    HoVLE/InternVL ``chat()`` does (``str.replace(..., 1)`` per image). Unlike that code, a
    placeholder count that differs from the number of images is an error.

    Args:
        prompt: Text with one ``<image>`` per image.
        num_patches_list: Tiles per image (e.g. ``[pixel_values.shape[0]]``).
        num_image_token: Tokens per tile (256 for HoVLE).

    Returns:
        The expanded prompt.

    Raises:
        ValueError: If the number of placeholders differs from ``len(num_patches_list)``.
    """
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found != len(num_patches_list):
        raise ValueError(
            f"prompt has {found} {IMAGE_PLACEHOLDER} placeholders but {len(num_patches_list)} "
            "images were given"
        )
    for tiles in num_patches_list:
        block = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * tiles) + IMG_END_TOKEN
        prompt = prompt.replace(IMAGE_PLACEHOLDER, block, 1)
    return prompt


class ChatTemplate:
    """An MPT-style chat template (the style of InternVL's ``internlm2-chat`` and ``Hermes-2``).

    Rendering: ``system_template.format(system_message) + sep``, then for every message
    ``role_prefix + content + sep``; a trailing assistant turn with empty content renders as the
    bare assistant prefix (generation prompt). There is no newline after ``sep``.

    Args:
        name: Template name.
        system_template: Format string with ``{system_message}``.
        system_message: Default system message.
        roles: Prefixes of the user and assistant turns.
        sep: Separator closing each turn (also the stop token of generation).
    """

    def __init__(
        self,
        name: str,
        system_template: str,
        system_message: str,
        roles: tuple[str, str],
        sep: str,
    ) -> None:
        self.name = name
        self.system_template = system_template
        self.system_message = system_message
        self.roles = roles
        self.sep = sep

    def render(
        self,
        turns: Sequence[tuple[str, str | None]],
        system_message: str | None = None,
    ) -> str:
        """Render ``(role, content)`` turns, role in ``{"user", "assistant"}``.

        Args:
            turns: Alternating turns; ``None``/empty content means "no content" (prefix only).
            system_message: Overrides the default system message.

        Returns:
            The prompt string.
        """
        prefix = {"user": self.roles[0], "assistant": self.roles[1]}
        message = self.system_message if system_message is None else system_message
        out = self.system_template.format(system_message=message) + self.sep
        for role, content in turns:
            out += prefix[role] + (content + self.sep if content else "")
        return out


_INTERNVL_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)

CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    name: ChatTemplate(
        name=name,
        system_template="<|im_start|>system\n{system_message}",
        system_message=_INTERNVL_SYSTEM_MESSAGE,
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep="<|im_end|>",
    )
    for name in ("internlm2-chat", "Hermes-2")
}
"""Supported templates. ``internlm2-chat`` (InternLM2-based InternVL models; expected for
HoVLE) and ``Hermes-2`` render identically (they differ only in InternVL's stop string)."""


def render_chat(
    messages: Sequence[Mapping[str, str | None]],
    template_name: str = "internlm2-chat",
    add_generation_prompt: bool = True,
) -> str:
    """Render chat messages with a HoVLE/InternVL template.

    Example for ``internlm2-chat`` with one user message ``"Hi"``::

        <|im_start|>system\\n{system}<|im_end|><|im_start|>user\\nHi<|im_end|><|im_start|>assistant\\n

    Args:
        messages: Dicts with ``role`` (``"system"``, ``"user"`` or ``"assistant"``) and
            ``content``. An optional ``system`` message must come first and replaces the
            template's default system message; user and assistant turns must alternate, user
            first.
        template_name: A key of :data:`CHAT_TEMPLATES`.
        add_generation_prompt: Append the assistant prefix when the last turn is the user's.

    Returns:
        The prompt string (``<image>`` placeholders are left for
        :func:`expand_image_placeholders`).

    Raises:
        ValueError: On an unknown template, unknown role or badly ordered turns.
    """
    if template_name not in CHAT_TEMPLATES:
        raise ValueError(
            f"unknown chat template {template_name!r}; supported: {sorted(CHAT_TEMPLATES)}"
        )
    template = CHAT_TEMPLATES[template_name]
    system: str | None = None
    turns: list[tuple[str, str | None]] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role == "system":
            if i != 0:
                raise ValueError("a system message may only come first")
            system = content or ""
            continue
        if role not in ("user", "assistant"):
            raise ValueError(f"message {i}: unknown role {role!r}")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i}: expected a {expected} turn, got {role}")
        turns.append((role, content))
    if add_generation_prompt and turns and turns[-1][0] == "user":
        turns.append(("assistant", None))
    return template.render(turns, system_message=system)


def build_chat_prompt(
    question: str,
    num_patches_list: Sequence[int],
    num_image_token: int,
    template_name: str = "internlm2-chat",
    history: Sequence[tuple[str, str]] = (),
    system_message: str | None = None,
) -> str:
    """The exact query string HoVLE/InternVL ``chat()`` tokenises.

    Prepends ``"<image>\\n"`` to the question when images are given, no history is given and the
    question has no placeholder; renders history and question with the template and a generation
    prompt; then expands the placeholders.

    Args:
        question: The user's question.
        num_patches_list: Tiles per image (empty for text-only).
        num_image_token: Tokens per tile.
        template_name: A key of :data:`CHAT_TEMPLATES`.
        history: Earlier ``(question, answer)`` pairs.
        system_message: Overrides the template's system message.

    Returns:
        The prompt string.
    """
    if num_patches_list and not history and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    messages: list[dict[str, str | None]] = []
    if system_message is not None:
        messages.append({"role": "system", "content": system_message})
    for old_question, old_answer in history:
        messages.append({"role": "user", "content": old_question})
        messages.append({"role": "assistant", "content": old_answer})
    messages.append({"role": "user", "content": question})
    prompt = render_chat(messages, template_name, add_generation_prompt=True)
    return expand_image_placeholders(prompt, num_patches_list, num_image_token)
