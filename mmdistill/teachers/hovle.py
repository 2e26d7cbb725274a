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

from ..errors import TeacherError
from ..frontends.hovle_vision import HoVLEVisionConfig
from ..lm_config import LMConfig
from .base import Rule, TeacherAdapter, register_adapter
from .hf import internlm2_layer_rules, internlm2_stack

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
