"""Seeding (mmMamba; docs/method.md): build a student from a teacher by replacing attention modules
with Mamba-2 mixers initialised from the attention weights.

Per converted layer: ``C ← W_Q``, ``B ← W_K``, ``x ← W_V`` (with biases), ``out_proj ← W_O``;
the new SSM parameters get mmMamba's initial values (identity conv, zero dt projection,
log-uniform dt, ``A_log = 1``, small gate, unit norm). Everything else is the teacher's.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from .attention_layers import layer_types_for
from .decoder import Attention
from .errors import MmdistillError
from .lm_config import LMConfig
from .mixer import Mamba2Mixer
from .model import DecoderLM, build_from_state_dict
from .roles import INHERITED_PARAMS


def planned_config(
    config: LMConfig, attention_layers="none", mixer: dict | None = None
) -> LMConfig:
    """The configuration of the student :func:`seed` builds from a teacher of ``config`` (no
    weights needed: e.g. to say before any training whether it can be exported).

    Raises:
        MmdistillError: a bad layout, or a teacher that already has Mamba layers.
    """
    try:
        layer_types = layer_types_for(attention_layers, config.num_layers)
    except ValueError as exc:
        raise MmdistillError(str(exc)) from exc
    already = [i for i, t in enumerate(config.layer_types) if t != "attention"]
    if already:
        raise MmdistillError(f"the teacher already has Mamba layers {already}: seed from a teacher")
    options = {**config.mixer, **(mixer or {})}
    return replace(copy.deepcopy(config), layer_types=layer_types, mixer=options)


def seed(
    teacher: DecoderLM,
    attention_layers="none",
    mixer: dict | None = None,
    seed: int = 0,
) -> DecoderLM:
    """Build a seeded student.

    Args:
        teacher: a loaded teacher (all layers attention).
        attention_layers: layout spec, see :mod:`mmdistill.attention_layers`.
        mixer: mixer options (``conv_kernel``, ``gate_order``, ``use_D``, ``backend``, ...).
        seed: RNG seed for the new parameters (dt_bias, gate).

    Returns:
        The student, same dtype and device as the teacher, in eval mode, all parameters
        trainable.
    """
    student_config = planned_config(teacher.config, attention_layers, mixer)
    layer_types = student_config.layer_types
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.device("meta"):
            student = DecoderLM(student_config)
    except ValueError as exc:
        raise MmdistillError(f"invalid mixer settings: {exc}") from exc
    # Inherit every shared parameter by reference to a copy of the teacher's tensors.
    teacher_state = teacher.state_dict()
    student_state = {}
    for key, value in student.state_dict().items():
        if key in teacher_state and teacher_state[key].shape == value.shape:
            student_state[key] = teacher_state[key].detach().clone()
    for i, kind in enumerate(layer_types):
        if kind != "mamba":
            continue
        attn = teacher.layers[i].mixer
        assert isinstance(attn, Attention)
        mixer_module: Mamba2Mixer = student.layers[i].mixer
        if mixer_module.config.d_state != attn.head_dim:
            raise MmdistillError(
                f"mixer d_state ({mixer_module.config.d_state}) must equal the teacher head_dim "
                f"({attn.head_dim}) for seeding: C and B come from W_Q and W_K"
            )
        fresh = Mamba2Mixer(mixer_module.config)  # CPU, initialised as mmMamba prescribes
        fresh.reset_new_parameters(generator)
        fresh.to(dtype=teacher.dtype)
        with torch.no_grad():
            fresh.c_proj.load_state_dict(attn.q_proj.state_dict())
            fresh.b_proj.load_state_dict(attn.k_proj.state_dict())
            fresh.x_proj.load_state_dict(attn.v_proj.state_dict())
            fresh.out_proj.load_state_dict(attn.o_proj.state_dict())
            if fresh.config.bc_norm:
                fresh.c_norm_weight.copy_(attn.q_norm.weight)
                fresh.b_norm_weight.copy_(attn.k_norm.weight)
        for name, tensor in fresh.state_dict().items():
            student_state[f"layers.{i}.mixer.{name}"] = tensor.clone()
    missing = set(student.state_dict()) - set(student_state)
    if student_config.tie_word_embeddings:
        missing.discard("lm_head.weight")
        student_state.pop("lm_head.weight", None)
    if missing:
        raise MmdistillError(f"seeding left parameters unset: {sorted(missing)[:5]}")
    student = build_from_state_dict(student_config, student_state, None).to(teacher.device)
    return student


def count_parameters(student: DecoderLM) -> dict[str, int]:
    """Inherited vs new parameters of a seeded student (new = the mixers' SSM parameters)."""
    new = total = 0
    for name, p in student.named_parameters():
        total += p.numel()
        if ".mixer." in name:
            module = name.split(".mixer.", 1)[1].split(".", 1)[0]
            is_mamba = student.config.layer_types[int(name.split(".")[1])] == "mamba"
            if is_mamba and module not in INHERITED_PARAMS:
                new += p.numel()
    return {"total": total, "new": new, "inherited": total - new}
