"""Parameter roles: the named groups of a :class:`~mmdistill.model.DecoderLM`'s parameters that a
recipe stage trains (:func:`parameter_role`, :func:`set_trainable`).

=============  ==============================================================================
``ssm``        new Mamba-2 parameters: mixer ``z_proj, dt_proj, dt_bias, A_log, conv1d,
               norm_weight, D``
``qkv``        inherited Q/K/V of the mixers: ``c_proj, b_proj, x_proj``
``out_proj``   mixer ``out_proj`` (from W_O)
``attention``  q/k/v/o of the layers that keep attention (hybrid students)
``mlp``        the MLPs
``norms``      every RMSNorm (per layer and final)
``embeddings`` text embedding tables (``front.``) and the LM head
``vision``     the vision front-end (HoVLE: ``front.vision_embeddings``,
               ``front.pixel_shuffle_proj``; LLaVA: ``front.vision_tower``,
               ``front.multi_modal_projector``)
``image_embeddings``  the image vocabulary's inputs: code and layout-token embeddings, code
               positions, the projector (``image_vocab.{embed,layout,position,projector}``)
``image_head`` the image head (``image_vocab.head``)
``lora``       task LoRA adapters on the mixers' input projections (``...lora_A/lora_B...``);
               a stage trains the adapters of its own task(s) only
=============  ==============================================================================

Which role trains in which stage, and why: docs/method.md.
"""

from __future__ import annotations

from typing import Literal

ROLES = (
    "ssm",
    "qkv",
    "out_proj",
    "attention",
    "mlp",
    "norms",
    "embeddings",
    "vision",
    "image_embeddings",
    "image_head",
    "lora",
)
"""Every role, in the order recipes list them."""
MIXER_ROLES = ("ssm", "qkv", "out_proj")
"""The roles of a converted layer's Mamba-2 mixer."""
Role = Literal[ROLES]

SSM_PARAMS = ("z_proj", "dt_proj", "dt_bias", "A_log", "conv1d", "norm_weight", "D")
QKV_PARAMS = ("c_proj", "b_proj", "x_proj")
INHERITED_PARAMS = (*QKV_PARAMS, "out_proj")
"""Mixer parameters copied from the teacher's attention (Q/K/V/O); the others are new."""
ATTENTION_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj")
VISION_MODULES = (
    "vision_embeddings",
    "pixel_shuffle_proj",
    "vision_tower",
    "multi_modal_projector",
)
EMBEDDING_MODULES = ("llm_text_embeddings", "special_text_embeddings", "embed_tokens")


def parameter_role(name: str) -> str:
    """The role of a :class:`~mmdistill.model.DecoderLM` parameter (see module docstring).

    Raises:
        ValueError: for a parameter no role claims (so a new module cannot train or freeze
            silently).
    """
    parts = name.split(".")
    head = parts[0]
    if "lora_A" in parts or "lora_B" in parts:
        return "lora"
    if head == "image_vocab" and len(parts) > 1:
        return "image_head" if parts[1] == "head" else "image_embeddings"
    if head == "front" and len(parts) > 1:
        if parts[1] in VISION_MODULES:
            return "vision"
        if parts[1] in EMBEDDING_MODULES:
            return "embeddings"
    elif head == "lm_head":
        return "embeddings"
    elif head == "norm":
        return "norms"
    elif head == "layers" and len(parts) > 3:
        sub, leaf = parts[2], parts[3]
        if sub in ("input_norm", "post_norm"):
            return "norms"
        if sub == "mlp":
            return "mlp"
        if sub == "mixer":
            if leaf in SSM_PARAMS:
                return "ssm"
            if leaf in QKV_PARAMS:
                return "qkv"
            if leaf == "out_proj":
                return "out_proj"
            if leaf in ATTENTION_PARAMS:
                return "attention"
    raise ValueError(f"parameter {name!r} has no role; extend mmdistill.roles.parameter_role")


def set_trainable(model, roles: list[str]) -> dict[str, int]:
    """Unfreeze exactly the parameters whose role is in ``roles``; freeze the rest.

    Returns:
        Number of trainable elements per role in ``roles`` (0 for a role this model lacks).
    """
    counts = dict.fromkeys(roles, 0)
    for name, param in model.named_parameters():
        role = parameter_role(name)
        param.requires_grad_(role in counts)
        if role in counts:
            counts[role] += param.numel()
    return counts
