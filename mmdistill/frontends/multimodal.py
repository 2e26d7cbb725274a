"""What a model's front-end needs of its images and prompts, by front-end type: HoVLE's tiles
and ``<IMG_CONTEXT>`` spans (:mod:`.hovle`) or LLaVA's processor and image tokens (:mod:`.llava`).
Text-only models take no images."""

from __future__ import annotations

import torch

from ..errors import DataError
from . import hovle, llava

_IMAGES = {"hovle": hovle, "llava": llava}


def is_multimodal(config) -> bool:
    """Whether the model takes images."""
    return config.front_end.get("type") in _IMAGES


def prepare_images(config, images: list) -> tuple[torch.Tensor | None, list[int]]:
    """Images (paths or PIL) as the model's ``pixel_values`` and the tiles of each image."""
    if not images:
        return None, []
    if not is_multimodal(config):
        raise DataError("this model has a text-only front-end; it takes no images")
    return _IMAGES[config.front_end["type"]].prepare_images(config, images)


def expand_prompt(config, text: str, tiles: list[int]) -> str:
    """Each ``<image>`` of ``text`` replaced by the model's image-token span."""
    return _IMAGES[config.front_end["type"]].expand_prompt(config, text, tiles)
