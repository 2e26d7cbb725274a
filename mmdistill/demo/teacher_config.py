"""What the demo teacher is a function of: :class:`ShapesTeacherConfig` and its overrides.

The build (:mod:`mmdistill.demo.teacher_builder`) is deterministic in this config (same config,
thread count and machine: bit-identical weights). Overrides use the recipes' dotlist syntax
(:func:`mmdistill.recipe.apply_overrides`): ``steps=500``, ``schedule.warmup_steps=20``,
``kinds=[count,size]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..data.synthetic import QA_KINDS
from ..errors import RecipeError, TeacherError
from ..recipe import ScheduleSpec, apply_overrides, format_errors
from ..teachers.hovle_export import HoVLESizes
from .teacher import DEMO_KINDS

__all__ = ["ShapesTeacherConfig", "config_with_overrides"]


def _default_schedule() -> ScheduleSpec:
    return ScheduleSpec(kind="cosine", warmup_steps=100, min_lr_ratio=0.05)


class ShapesTeacherConfig(BaseModel):
    """Everything the demo teacher is a function of.

    Attributes:
        hidden_size: Width of both stacks.
        num_attention_heads: Query heads.
        num_key_value_heads: KV heads.
        intermediate_size: MLP width.
        num_embedding_layers: Layers of the holistic embedding module.
        num_llm_layers: LLM layers.
        image_size: Tile side in pixels (and the generated images' size).
        patch_size: Patch side; a tile becomes ``(image_size / patch_size / 2) ** 2`` tokens.
        tokenizer_vocab_size: Target sentencepiece vocabulary (every attribute word must become
            one token).
        dtype: Dtype of the written weights.
        seed: Seed of the data, the initial weights and the batch order.
        n_images: Generated training images; each gives a conversation of all its questions, one
            single-question conversation per question, and a caption conversation.
        max_shapes: Most shapes per image (1-4).
        kinds: Question kinds trained on (entries of ``QA_KINDS``), asked in a random order per
            image.
        text_lines: Lines of templated text; they train the tokenizer, and the model too when
            ``text_batch_size`` is positive (plain language modelling, no image).
        warmup_front_end_steps: Steps of the front-end alignment before language modelling.
        warmup_front_end_batch_size: Images per front-end alignment step.
        steps: Language-modelling optimiser steps.
        batch_size: Single-question conversations per step (as HoVLE's ``chat()`` asks).
        dialogue_batch_size: Conversations of all of an image's questions per step (as
            ``builtin:shapes`` writes them).
        caption_batch_size: Caption conversations per step.
        text_batch_size: Text lines per step (0: none).
        dialogue_weight: Weight of the dialogue loss (each part's loss is a per-token mean).
        caption_weight: Weight of the caption loss.
        text_weight: Weight of the text loss.
        lr: Peak learning rate (AdamW).
        schedule: Learning-rate schedule (the trainer's :func:`~mmdistill.training.schedule.lr_multiplier`).
        weight_decay: AdamW weight decay of matrices (:func:`~mmdistill.training.schedule.param_groups`).
        grad_clip: Gradient-norm clip.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    hidden_size: int = Field(128, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=1)
    num_embedding_layers: int = Field(2, ge=1)
    num_llm_layers: int = Field(4, ge=1)
    image_size: int = Field(56, ge=32)
    patch_size: int = Field(14, ge=1)
    tokenizer_vocab_size: int = Field(640, ge=64)
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    n_images: int = Field(6000, ge=1)
    max_shapes: int = Field(3, ge=1, le=4)
    kinds: tuple[str, ...] = DEMO_KINDS
    text_lines: int = Field(1000, ge=0)
    warmup_front_end_steps: int = Field(400, ge=0)
    warmup_front_end_batch_size: int = Field(56, ge=1)
    steps: int = Field(1100, ge=1)
    batch_size: int = Field(48, ge=1)
    dialogue_batch_size: int = Field(4, ge=0)
    caption_batch_size: int = Field(6, ge=0)
    text_batch_size: int = Field(0, ge=0)
    dialogue_weight: float = Field(1.0, ge=0)
    caption_weight: float = Field(1.0, ge=0)
    text_weight: float = Field(0.5, ge=0)
    lr: float = Field(2e-3, gt=0)
    schedule: ScheduleSpec = Field(default_factory=_default_schedule)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(kinds) - set(QA_KINDS))
        if unknown or not kinds:
            raise ValueError(f"must be entries of {', '.join(QA_KINDS)}; got {list(kinds)}")
        return kinds

    @model_validator(mode="after")
    def _text_to_train_on(self) -> ShapesTeacherConfig:
        if self.text_batch_size and not self.text_lines:
            raise ValueError("text_batch_size needs text_lines")
        return self

    def sizes(self) -> HoVLESizes:
        """The HoVLE sizes written into ``config.json`` (one tile per image, no thumbnail)."""
        return HoVLESizes(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            num_embedding_layers=self.num_embedding_layers,
            num_llm_layers=self.num_llm_layers,
            image_size=self.image_size,
            patch_size=self.patch_size,
            tokenizer_vocab_size=self.tokenizer_vocab_size,
            llm_rope_scaling=None,
            max_dynamic_patch=1,
            dynamic_image_size=False,
            use_thumbnail=False,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able plain data (lists for tuples)."""
        return self.model_dump(mode="json")


def config_with_overrides(
    overrides: Sequence[str], base: ShapesTeacherConfig | None = None
) -> ShapesTeacherConfig:
    """``base`` (default: the demo's config) with dotlist ``key=value`` overrides applied.

    Values are YAML (:func:`mmdistill.recipe.parse_value`): ``lr=1e-3``,
    ``kinds=[count,size]``, ``schedule.kind=wsd``.

    Raises:
        TeacherError: For an override that is not ``key=value``, an unknown key, or a value of
            the wrong type or range; the message names the key.
    """
    data = (base or ShapesTeacherConfig()).to_dict()
    try:
        data = apply_overrides(data, list(overrides))
    except RecipeError as exc:
        raise TeacherError(f"shapes-teacher setting {exc}") from None
    try:
        return ShapesTeacherConfig.model_validate(data)
    except ValidationError as exc:
        raise TeacherError(f"shapes-teacher settings: {format_errors(exc)}") from None
