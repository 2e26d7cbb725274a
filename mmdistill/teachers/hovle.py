"""HoVLE (``InternVLChatModel`` with a ``holistic_embedding`` module), implemented natively.

HoVLE = a front-end (patch embedding + position table → pixel shuffle → projection; text
embeddings; image tokens written at ``<IMG_CONTEXT>`` positions) → the embedding module's
InternLM2 decoder layers → (optional L2 normalisation, ``normalize_encoder_output``) → the LLM's
InternLM2 layers → norm → ``output``. In the canonical model these are one flat list of layers:
the embedding module's first, then the LLM's (8 + 24 = 32 for HoVLE-2.6B). The LLM's own
``tok_embeddings`` is never used on this path and is not loaded. Facts and their sources:
docs/hovle_format.md.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from ..errors import DataError, TeacherError
from ..model import LMConfig, register_front_end
from .base import Rule, TeacherAdapter, register_adapter
from .hf import internlm2_layer_rules, internlm2_stack
from .hovle_image import build_chat_prompt, expand_image_placeholders, load_image
from .hovle_vision import HoVLEVisionConfig, HoVLEVisionFrontEnd

IMAGE_KEYS = (
    "force_image_size",
    "dynamic_image_size",
    "use_thumbnail",
    "min_dynamic_patch",
    "max_dynamic_patch",
    "template",
    "downsample_ratio",
    "ps_version",
)


@register_front_end("hovle")
class HoVLEFrontEnd(HoVLEVisionFrontEnd):
    """HoVLE's embedding front-end as a :class:`~mmdistill.model.DecoderLM` front-end."""

    def __init__(self, config: LMConfig):
        super().__init__(HoVLEVisionConfig(**config.front_end["vision"]))

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.vision_embeddings.patch_embedding.weight.dtype)
        return self.embed_inputs(input_ids, pixel_values)

    def token_embeddings(self) -> torch.nn.Embedding:
        return self.llm_text_embeddings


class HoVLEAdapter(TeacherAdapter):
    name = "hovle"
    architectures = ("InternVLChatModel",)
    description = "HoVLE (holistic embedding module + InternLM2), native implementation"

    def matches(self, hf_config: dict) -> bool:
        emb = hf_config.get("embedding_config") or {}
        return super().matches(hf_config) and emb.get("model_type") == "holistic_embedding"

    def lm_config(self, hf_config: dict) -> LMConfig:
        emb, llm = hf_config["embedding_config"], hf_config["llm_config"]
        try:
            vision = HoVLEVisionConfig.from_embedding_config(emb, hf_config.get("force_image_size"))
        except ValueError as exc:
            raise TeacherError(f"unsupported HoVLE embedding_config: {exc}") from exc
        emb_stack = internlm2_stack(emb, name="embedding")
        llm_stack = internlm2_stack(llm, name="llm")
        if hf_config.get("normalize_encoder_output"):
            llm_stack.l2_normalize_input = True
        if emb["hidden_size"] != llm["hidden_size"]:
            raise TeacherError("HoVLE embedding and LLM widths differ; not supported")
        front = {
            "type": "hovle",
            "vision": asdict(vision),
            "num_image_token": vision.num_image_token,
        }
        front.update({k: hf_config[k] for k in IMAGE_KEYS if k in hf_config})
        return LMConfig(
            vocab_size=llm["vocab_size"],
            hidden_size=llm["hidden_size"],
            stacks=[emb_stack, llm_stack],
            front_end=front,
            final_norm_eps=llm_stack.rms_norm_eps,
            tie_word_embeddings=False,
            bos_token_id=llm.get("bos_token_id"),
            eos_token_id=llm.get("eos_token_id"),
            pad_token_id=llm.get("pad_token_id"),
        )

    def rules(self, hf_config: dict) -> list[Rule]:
        emb, llm = hf_config["embedding_config"], hf_config["llm_config"]
        emb_stack = internlm2_stack(emb, name="embedding")
        llm_stack = internlm2_stack(llm, name="llm")
        front = r"embedding_model\.((?:vision_embeddings|llm_text_embeddings|special_text_embeddings|pixel_shuffle_proj)\..+)"
        return [
            Rule(front, "front.{0}"),
            *internlm2_layer_rules("embedding_model.encoder.", emb_stack),
            *internlm2_layer_rules("language_model.model.layers.", llm_stack, emb_stack.num_layers),
            Rule(r"language_model\.model\.norm\.weight", "norm.weight"),
            Rule(r"language_model\.output\.weight", "lm_head.weight"),
            # Unused by HoVLE: the embedding module produces the LLM's inputs_embeds.
            Rule(r"language_model\.model\.tok_embeddings\.weight", None),
        ]


register_adapter(HoVLEAdapter())


def image_settings(config: LMConfig) -> dict:
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


def prepare_images(config: LMConfig, images: list) -> tuple[torch.Tensor | None, list[int]]:
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


def expand_prompt(config: LMConfig, text: str, tiles: list[int]) -> str:
    """Replace each ``<image>`` of a raw training text with its image-token span."""
    return expand_image_placeholders(text, tiles, int(config.front_end["num_image_token"]))


def chat_prompt(config: LMConfig, question: str, tiles: list[int]) -> str:
    """The prompt HoVLE's ``chat()`` builds for a single-turn question."""
    template = config.front_end.get("template") or "internlm2-chat"
    return build_chat_prompt(question, tiles, int(config.front_end["num_image_token"]), template)


def is_hovle(config: LMConfig) -> bool:
    return config.front_end.get("type") == "hovle"
