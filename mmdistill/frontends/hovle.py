"""HoVLE's front-end as a model front-end, and the input preparation it needs.

:class:`HoVLEFrontEnd` wraps :class:`~mmdistill.frontends.hovle_vision.HoVLEVisionFrontEnd` for a
model whose ``config.front_end["type"]`` is ``"hovle"``; the functions below tile images and
build prompts from the same ``config.front_end`` settings (written by the HoVLE adapter).
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .hovle_image import build_chat_prompt, expand_image_placeholders, load_image
from .hovle_vision import HoVLEVisionConfig, HoVLEVisionFrontEnd


class HoVLEFrontEnd(HoVLEVisionFrontEnd):
    """HoVLE's embedding front-end as a :class:`~mmdistill.model.DecoderLM` front-end."""

    def __init__(self, config):
        super().__init__(HoVLEVisionConfig(**config.front_end["vision"]))

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.vision_embeddings.patch_embedding.weight.dtype)
        return self.embed_inputs(input_ids, pixel_values)

    def token_embeddings(self) -> torch.nn.Embedding:
        return self.llm_text_embeddings


def image_settings(config) -> dict:
    """Tile size and tiling options of a HoVLE-family model."""
    front = config.front_end
    size = front.get("force_image_size") or front["vision"]["image_size"]
    return dict(
        input_size=int(size),
        max_num=int(front.get("max_dynamic_patch", 12)),
        min_num=int(front.get("min_dynamic_patch", 1)),
        use_thumbnail=bool(front.get("use_thumbnail", True)),
        dynamic=bool(front.get("dynamic_image_size", True)),
    )


def prepare_images(config, images: list) -> tuple[torch.Tensor | None, list[int]]:
    """Load and tile ``images`` (paths or PIL) -> (``[tiles, 3, s, s]`` or None, tiles per image)."""
    if not images:
        return None, []
    settings = image_settings(config)
    tensors = []
    for image in images:
        try:
            tensors.append(load_image(image, **settings))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(str(exc)) from exc
    return torch.cat(tensors), [t.shape[0] for t in tensors]


def expand_prompt(config, text: str, tiles: list[int]) -> str:
    """Replace each ``<image>`` of a raw training text with its image-token span."""
    return expand_image_placeholders(text, tiles, int(config.front_end["num_image_token"]))


def chat_prompt(config, question: str, tiles: list[int]) -> str:
    """The prompt HoVLE's ``chat()`` builds for a single-turn question."""
    template = config.front_end.get("template") or "internlm2-chat"
    return build_chat_prompt(question, tiles, int(config.front_end["num_image_token"]), template)


def is_hovle(config) -> bool:
    return config.front_end.get("type") == "hovle"
