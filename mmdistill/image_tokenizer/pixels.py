"""Pixels: PIL images <-> the tokenizer's float tensors, and palette checks for flat colours.

A tokenizer takes ``[n, 3, size, size]`` float tensors in [-1, 1] (``2 * value / 255 - 1``, as
LlamaGen). :func:`images_to_tensor` resizes with **nearest-neighbour** sampling: the images this
package tokenizes are mostly flat-colour drawings (the shapes world), and nearest keeps every pixel
an exact colour of the original, where bilinear or bicubic filters would invent blended edge colours
no palette has. Photographs are better resized (and centre-cropped) before they get here.

:func:`palette_indices` and :func:`palette_agreement` measure a reconstruction of a flat-colour
image: each pixel is snapped to its nearest palette colour and compared with the original's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def images_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """``[n, 3, size, size]`` float32 in [-1, 1] from PIL images (converted to RGB; resized
    with nearest-neighbour sampling when their size is not ``size x size``)."""
    arrays = []
    for image in images:
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.NEAREST)
        arrays.append(np.asarray(rgb, dtype=np.uint8))
    if not arrays:
        return torch.empty(0, 3, size, size)
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return stacked.float() / 127.5 - 1.0


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 from ``[n, 3, H, W]`` floats in [-1, 1] (clamped, rounded)."""
    scaled = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """RGB PIL images from ``[n, 3, H, W]`` floats in [-1, 1]."""
    return [Image.fromarray(array, mode="RGB") for array in tensor_to_uint8(images)]


def palette_indices(pixels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """For ``[..., 3]`` RGB values, the index of the nearest palette colour (Euclidean)."""
    colours = np.asarray(palette, dtype=np.int64)
    diff = pixels[..., None, :].astype(np.int64) - colours
    return (diff * diff).sum(-1).argmin(-1)


def palette_agreement(
    original: np.ndarray, decoded: np.ndarray, palette: Sequence[Sequence[int]]
) -> np.ndarray:
    """Per image, the fraction of pixels whose nearest palette colour is the same in both.

    Args:
        original: ``[n, H, W, 3]`` uint8.
        decoded: ``[n, H, W, 3]`` uint8, same shape.
        palette: the RGB colours the images are drawn with.

    Returns:
        ``[n]`` float64 fractions in [0, 1].
    """
    same = palette_indices(original, palette) == palette_indices(decoded, palette)
    return same.reshape(len(same), -1).mean(axis=1)
