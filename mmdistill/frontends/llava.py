"""LLaVA's front-end: transformers' own vision tower and projector, frozen, in front of the LM.

A ``LlavaForConditionalGeneration`` checkpoint (a CLIP or SigLIP vision tower, a two-layer
projector and a Llama / Qwen2 / Mistral language model) becomes a
:class:`~mmdistill.model.DecoderLM` whose front-end is :class:`LlavaFrontEnd`: token embeddings,
and for each image the vision tower's features (transformers' ``LlavaModel.get_image_features``:
the ``vision_feature_layer`` hidden states, the CLS token dropped under the ``default``
strategy, then the projector) written over the image tokens, as ``LlavaModel.forward`` does.
Nothing of the vision side is re-implemented: the modules are transformers' classes built from
the checkpoint's ``vision_config`` and ``LlavaConfig``.

``config.front_end`` (``type: llava``) holds the checkpoint's config without its
``text_config`` (``llava``), the image token (``image_token``, ``image_token_id``), the number
of image tokens per image (``num_image_token``) and the image processor's settings
(``image_processor``, from ``preprocessor_config.json``), so a student needs nothing of the
teacher's folder to take images. Images are preprocessed by transformers' own image processor
(:func:`prepare_images`); each ``<image>`` of a prompt becomes ``num_image_token`` image tokens
(:func:`expand_prompt`), as ``LlavaProcessor`` writes them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..chat import IMAGE_PLACEHOLDER
from ..errors import DataError
from .hovle_image import open_image


def llava_config(front_end: dict, hidden_size: int):
    """transformers' ``LlavaConfig`` of a front-end (its text side reduced to the LM width)."""
    from transformers import LlavaConfig

    settings = copy.deepcopy(front_end["llava"])
    # The projector reads only the text width; the language model itself is ours.
    settings["text_config"] = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
    }
    return LlavaConfig(**settings)


class LlavaFrontEnd(nn.Module):
    """Token embeddings plus LLaVA's vision tower and projector (transformers' modules)."""

    def __init__(self, config):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.config = llava_config(config.front_end, config.hidden_size)  # read by transformers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_tower = AutoModel.from_config(self.config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(self.config)
        self.image_token_id = int(config.front_end["image_token_id"])

    def reset_buffers(self) -> None:
        """Give buffers no checkpoint holds (e.g. CLIP's ``position_ids``) their values after a
        build on the meta device: taken from a vision tower built without weight init."""
        from transformers import AutoModel
        from transformers.initialization import no_init_weights

        meta = [n for n, b in self.vision_tower.named_buffers() if b.is_meta]
        if not meta:
            return
        with torch.device("cpu"), no_init_weights():
            fresh = dict(AutoModel.from_config(self.config.vision_config).named_buffers())
        for name in meta:
            owner, _, leaf = name.rpartition(".")
            self.vision_tower.get_submodule(owner).register_buffer(
                leaf, fresh[name], persistent=False
            )

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[images, num_image_token, hidden]``: transformers' ``get_image_features``."""
        from transformers.models.llava.modeling_llava import LlavaModel

        dtype = self.multi_modal_projector.linear_1.weight.dtype
        out = LlavaModel.get_image_features(
            self,
            pixel_values.to(dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return torch.stack(list(out.pooler_output))

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
        mask = input_ids == self.image_token_id
        if int(mask.sum()) != features.shape[0]:
            raise DataError(
                f"{int(mask.sum())} image tokens in the input for {pixel_values.shape[0]} "
                f"images of {features.shape[0] // max(1, pixel_values.shape[0])} tokens each"
            )
        return embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))

    def token_embeddings(self) -> nn.Embedding:
        return self.embed_tokens


def image_tokens_per_image(hf_config: dict) -> int:
    """Image tokens ``LlavaProcessor`` writes per image: the vision tower's patch grid, plus
    its CLS token (CLIP has one, SigLIP none) unless the ``default`` strategy drops it."""
    vision = hf_config["vision_config"]
    grid = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    cls_token = 1 if vision.get("model_type", "clip_vision_model").startswith("clip") else 0
    default = hf_config.get("vision_feature_select_strategy", "default") == "default"
    return grid + cls_token - (1 if default else 0)


def _image_processor(front_end: dict):
    """transformers' image processor saved with the checkpoint (its class and settings). Without
    torchvision, its PIL variant, which transformers would fall back to anyway (with a warning
    on every call)."""
    import importlib.util

    import transformers

    settings = dict(front_end["image_processor"])
    name = settings.get("image_processor_type", "CLIPImageProcessor").removesuffix("Fast")
    pil = getattr(transformers, f"{name}Pil", None)
    if pil is not None and importlib.util.find_spec("torchvision") is None:
        return pil.from_dict(settings)
    return (getattr(transformers, name, None) or transformers.CLIPImageProcessor).from_dict(
        settings
    )


def prepare_images(config, images: list) -> tuple[torch.Tensor | None, list[int]]:
    """Images (paths or PIL) -> (``[n, 3, H, W]`` by the checkpoint's processor, ``[1] * n``)."""
    if not images:
        return None, []
    try:
        rgb = [open_image(image) for image in images]
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(str(exc)) from exc
    pixels = _image_processor(config.front_end)(images=rgb, return_tensors="pt")["pixel_values"]
    return pixels, [1] * len(rgb)


def expand_prompt(config, text: str, tiles: list[int]) -> str:
    """Each ``<image>`` of ``text`` as ``num_image_token`` image tokens (``tiles`` are all 1)."""
    front = config.front_end
    span = front["image_token"] * int(front["num_image_token"])
    return text.replace(IMAGE_PLACEHOLDER, span)
