"""LLaVA (``LlavaForConditionalGeneration``): a vision tower and projector in front of a Llama,
Qwen2 or Mistral language model.

The language model converts with its own family's adapter (its rules read under LLaVA's
prefixes: ``model.language_model.`` as transformers holds it, ``language_model.model.`` as it
saves it); the vision tower and projector are kept as transformers' modules in
:class:`~mmdistill.frontends.llava.LlavaFrontEnd`. Layer indices (``--attention-layers``) count
the language model's decoder layers. The image processor's settings and the image token come
from the checkpoint's folder (:meth:`LlavaAdapter.front_end_files`).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from pathlib import Path

from ..errors import TeacherError
from ..frontends.llava import image_tokens_per_image
from ..lm_config import LMConfig
from .base import Rule, TeacherAdapter, find_adapter, register_adapter

LANGUAGE_MODELS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
LM_PREFIX = r"(?:model\.language_model\.|language_model\.model\.)"
FRONT = r"(?:model\.)?(vision_tower|multi_modal_projector)\.(?:vision_model\.)?(.+)"


def text_config(hf_config: dict) -> dict:
    """The language model's config as its own checkpoint would have it."""
    text = copy.deepcopy(hf_config.get("text_config") or {})
    kind = text.get("model_type", "llama")
    if kind not in LANGUAGE_MODELS:
        raise TeacherError(
            f"LLaVA with a {kind!r} language model is not supported; supported: "
            f"{', '.join(LANGUAGE_MODELS)}"
        )
    text["architectures"] = [LANGUAGE_MODELS[kind]]
    return text


def _under_llava(rule: Rule) -> Rule:
    """A language-model rule read under LLaVA's prefixes."""
    pattern = rule.pattern
    if pattern.startswith(r"model\."):
        pattern = LM_PREFIX + pattern[len(r"model\.") :]
    elif pattern.startswith(r"lm_head\."):
        pattern = r"(?:language_model\.)?" + pattern
    return Rule(pattern, rule.target)


class LlavaAdapter(TeacherAdapter):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    description = "LLaVA (CLIP/SigLIP vision tower + projector, transformers' own modules)"

    def _text_adapter(self, hf_config: dict) -> tuple[TeacherAdapter, dict]:
        text = text_config(hf_config)
        return find_adapter(text, "LLaVA's text_config"), text

    def lm_config(self, hf_config: dict) -> LMConfig:
        adapter, text = self._text_adapter(hf_config)
        config = adapter.lm_config(text)
        llava = {k: v for k, v in hf_config.items() if k not in ("text_config", "architectures")}
        image_token_id = hf_config.get("image_token_id", hf_config.get("image_token_index"))
        front = {
            "type": "llava",
            "llava": llava,
            "image_token_id": int(image_token_id),
            "image_token": "<image>",
            "num_image_token": image_tokens_per_image(hf_config),
        }
        return replace(config, front_end=front)

    def rules(self, hf_config: dict) -> list[Rule]:
        adapter, text = self._text_adapter(hf_config)
        rules = [_under_llava(rule) for rule in adapter.rules(text)]
        return [Rule(FRONT, "front.{0}.{1}"), *rules]

    def front_end_files(self, directory: Path, config: LMConfig) -> dict:
        """The image processor's settings and the image token's text, from the folder."""
        path = directory / "preprocessor_config.json"
        if not path.is_file():
            raise TeacherError(
                f"{directory} has no preprocessor_config.json: save the checkpoint's image "
                "processor with it (processor.save_pretrained(directory))"
            )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        token = tokenizer.convert_ids_to_tokens(config.front_end["image_token_id"])
        if not isinstance(token, str) or not re.fullmatch(r"<[^<>]+>", token):
            raise TeacherError(
                f"{directory}: image_token_id {config.front_end['image_token_id']} is "
                f"{token!r} in the tokenizer, not a special token such as <image>"
            )
        return {"image_processor": json.loads(path.read_text()), "image_token": token}


register_adapter(LlavaAdapter())
