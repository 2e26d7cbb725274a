"""A student as stock transformers' ``GraniteMoeHybridForCausalLM`` (also in vLLM and SGLang).

With no experts and multipliers 1 that architecture is a dense hybrid that expresses our
text students exactly: per-layer ``layer_types`` (``"mamba"`` / ``"attention"``), GQA attention
with RoPE, a SwiGLU MLP in every layer (``shared_mlp.input_linear`` = [gate; up],
``output_linear`` = down), and standard Mamba-2 mixers (``in_proj`` = [z | x | B | C | dt], a
depthwise conv over [x | B | C], the SiLU gate applied before a grouped RMSNorm).

The mapping: ``mamba_n_heads = mamba_n_groups`` = our heads; x and B, shared by each GQA group
in our mixer, are repeated for every head of their group (rows of ``in_proj``, channels of the
depthwise conv: exact, the conv has no cross-channel terms); ``mamba_d_head`` = head_dim,
``mamba_d_state`` = our state size; ``attention_multiplier`` = the attention's score scale;
``embedding_multiplier`` = the front-end's embedding scale; a missing ``D`` is written as zeros
and a missing bias (the target has one flag per block) as zeros.

:func:`export_blockers` lists what a student has that the target cannot express, each with its
fix; :func:`granite_config` and :func:`granite_state_dict` are the mapping.
"""

from __future__ import annotations

import dataclasses

import torch

from ..decoder import StackConfig, mixer_config_for
from ..lm_config import LMConfig
from ..mixer import MixerConfig

ARCHITECTURE = "GraniteMoeHybridForCausalLM"
MODEL_TYPE = "granitemoehybrid"


def _differences(stacks: list[StackConfig]) -> list[str]:
    """The fields (besides the layer count and label) in which the stacks differ."""
    fields = [
        f.name for f in dataclasses.fields(StackConfig) if f.name not in ("num_layers", "name")
    ]
    return [f for f in fields if len({repr(getattr(s, f)) for s in stacks}) > 1]


def export_blockers(config: LMConfig) -> list[str]:
    """Why a student of ``config`` cannot be exported (each reason names its fix); ``[]`` when
    it can. Only the configuration is read, so this works on a planned student too."""
    if config.front_end.get("type", "text") != "text":
        return [
            f"a vision front-end ({config.front_end['type']}): {ARCHITECTURE} takes token ids "
            "only; serve multimodal students with mmdistill (docs/export.md)"
        ]
    stacks = config.stacks
    stack = stacks[0]
    mixer = mixer_config_for(config.hidden_size, stack, config.mixer)
    of_layer = config.stack_of_layer()
    kept = [stacks[of_layer[i]] for i, t in enumerate(config.layer_types) if t == "attention"]
    windowed = any(
        s.sliding_window is not None and s.sliding_window < s.max_position_embeddings for s in kept
    )
    checks = [
        (
            len(stacks) > 1,
            f"layers that differ in {', '.join(_differences(stacks))}; the target has one shape",
        ),
        (
            "mamba" in config.layer_types and mixer.gate_order != "before_norm",
            "the Mamba gate after the norm (mmMamba's order); seed with --gate-order before_norm",
        ),
        (
            windowed,
            "sliding-window attention in the layers that keep attention; the target has none",
        ),
        (
            any(s.hidden_act != "silu" for s in stacks),
            f"the {stack.hidden_act} activation; the target has SiLU",
        ),
        (
            any(s.num_heads * s.head_dim != config.hidden_size for s in stacks),
            f"heads x head_dim = {stack.num_heads * stack.head_dim} != hidden size "
            f"{config.hidden_size} (vLLM and SGLang assume they are equal)",
        ),
        (any(s.mlp_bias for s in stacks), "MLP biases; the target's MLP has none"),
        (
            any(s.qk_norm for s in stacks) or mixer.bc_norm,
            "query/key norms (Qwen3, Gemma 3); the target has none",
        ),
        (
            any(s.sandwich_norms for s in stacks),
            "norms after attention and MLP (Gemma); the target has none",
        ),
        (
            any(s.attn_softcap is not None for s in stacks)
            or config.final_logit_softcap is not None,
            "soft-capped attention scores or logits (Gemma 2); the target has none",
        ),
        (
            any(s.l2_normalize_input for s in stacks),
            "an L2-normalised residual stream; the target has none",
        ),
        (
            len({stack.rms_norm_eps, config.final_norm_eps, mixer.norm_eps}) > 1,
            "norm epsilons that differ between layers, mixers and the final norm",
        ),
        (config.image_vocab is not None, "an image vocabulary (OmniMamba); the target has none"),
        (config.lora is not None, "task LoRA adapters; merge one task first (merge_task)"),
    ]
    return [reason for blocked, reason in checks if blocked]


def export_verdict(config: LMConfig) -> dict:
    """``{"exportable", "architecture", "reasons"}`` for a (planned) student of ``config``."""
    reasons = export_blockers(config)
    return {"exportable": not reasons, "architecture": ARCHITECTURE, "reasons": reasons}


def granite_config(config: LMConfig) -> dict:
    """Keyword arguments of ``GraniteMoeHybridConfig`` for an exportable student."""
    stack = config.stacks[0]
    mixer = mixer_config_for(config.hidden_size, stack, config.mixer)
    rope = {**(stack.rope_scaling or {"rope_type": "default"}), "rope_theta": stack.rope_theta}
    return {
        "architectures": [ARCHITECTURE],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": stack.intermediate_size,
        "shared_intermediate_size": stack.intermediate_size,
        "num_hidden_layers": stack.num_layers,
        "num_attention_heads": stack.num_heads,
        "num_key_value_heads": stack.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": stack.max_position_embeddings,
        "rms_norm_eps": stack.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "rope",
        "rope_parameters": rope,
        # the same for readers of the older fields (transformers 4, vLLM and SGLang built on it)
        "rope_theta": stack.rope_theta,
        "rope_scaling": stack.rope_scaling,
        "attention_bias": stack.qkv_bias or stack.o_bias,
        "attention_multiplier": stack.attn_scale or stack.head_dim**-0.5,
        "embedding_multiplier": float(config.front_end.get("embedding_scale", 1.0)),
        "residual_multiplier": 1.0,
        "logits_scaling": 1.0,
        "num_local_experts": 0,
        "layer_types": ["mamba" if t == "mamba" else "attention" for t in config.layer_types],
        "mamba_n_heads": mixer.num_heads,
        "mamba_n_groups": mixer.num_heads,
        "mamba_d_head": mixer.head_dim,
        "mamba_d_state": mixer.d_state,
        "mamba_d_conv": mixer.conv_kernel,
        "mamba_expand": mixer.num_heads * mixer.head_dim // config.hidden_size,
        "mamba_conv_bias": True,
        "mamba_proj_bias": mixer.qkv_bias or mixer.out_bias,
    }


def _per_head(t: torch.Tensor, groups: int, heads: int) -> torch.Tensor:
    """Rows of ``t`` (one block per group) repeated for every head of their group."""
    block = t.reshape(groups, t.shape[0] // groups, *t.shape[1:])
    return block.repeat_interleave(heads // groups, dim=0).reshape(-1, *t.shape[1:])


def _mamba(sd: dict, pre: str, c: MixerConfig) -> dict[str, torch.Tensor]:
    """One mixer's tensors under the target's names (``mamba.*``)."""
    h, g, p, n = c.num_heads, c.num_kv_heads, c.head_dim, c.d_state

    def xbc(x: torch.Tensor, b: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
        return torch.cat([_per_head(x, g, h), _per_head(b, g, h), cc])

    def bias(name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        return sd.get(f"{pre}{name}.bias", torch.zeros(rows, dtype=like.dtype))

    w = {k: sd[f"{pre}{k}_proj.weight"] for k in ("z", "x", "b", "c", "dt", "out")}
    conv_w, conv_b = sd[f"{pre}conv1d.weight"], sd[f"{pre}conv1d.bias"]
    conv = [g * p, g * n, h * n]
    out = {
        "in_proj.weight": torch.cat([w["z"], xbc(w["x"], w["b"], w["c"]), w["dt"]]),
        "conv1d.weight": xbc(*conv_w.split(conv)),
        "conv1d.bias": xbc(*conv_b.split(conv)),
        "dt_bias": sd[f"{pre}dt_bias"],
        "A_log": sd[f"{pre}A_log"],
        "D": sd.get(f"{pre}D", torch.zeros(h, dtype=w["z"].dtype)),
        "norm.weight": sd[f"{pre}norm_weight"],
        "out_proj.weight": w["out"],
    }
    if c.qkv_bias or c.out_bias:
        x_b, b_b, c_b = (
            bias(f"{k}_proj", r, w["z"]) for k, r in (("x", g * p), ("b", g * n), ("c", h * n))
        )
        zeros = torch.zeros(h * p, dtype=w["z"].dtype)
        out["in_proj.bias"] = torch.cat(
            [zeros, xbc(x_b, b_b, c_b), torch.zeros(h, dtype=zeros.dtype)]
        )
        out["out_proj.bias"] = bias("out_proj", c.hidden_size, w["z"])
    return out


def _attention(sd: dict, pre: str, with_bias: bool) -> dict[str, torch.Tensor]:
    """One attention module's tensors under the target's names (``self_attn.*``)."""
    out = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        weight = sd[f"{pre}{name}.weight"]
        out[f"{name}.weight"] = weight
        if with_bias:
            zeros = torch.zeros(weight.shape[0], dtype=weight.dtype)
            out[f"{name}.bias"] = sd.get(f"{pre}{name}.bias", zeros)
    return out


def granite_state_dict(config: LMConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's state dict ``sd`` under ``GraniteMoeHybridForCausalLM``'s names."""
    stack = config.stacks[0]
    mixer = mixer_config_for(config.hidden_size, stack, config.mixer)
    out = {"model.embed_tokens.weight": sd["front.embed_tokens.weight"]}
    out["model.norm.weight"] = sd["norm.weight"]
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i, kind in enumerate(config.layer_types):
        pre, to = f"layers.{i}.", f"model.layers.{i}."
        out[f"{to}input_layernorm.weight"] = sd[f"{pre}input_norm.weight"]
        out[f"{to}post_attention_layernorm.weight"] = sd[f"{pre}post_norm.weight"]
        gate_up = [sd[f"{pre}mlp.gate_proj.weight"], sd[f"{pre}mlp.up_proj.weight"]]
        out[f"{to}shared_mlp.input_linear.weight"] = torch.cat(gate_up)
        out[f"{to}shared_mlp.output_linear.weight"] = sd[f"{pre}mlp.down_proj.weight"]
        if kind == "mamba":
            block = {f"mamba.{k}": v for k, v in _mamba(sd, f"{pre}mixer.", mixer).items()}
        else:
            with_bias = stack.qkv_bias or stack.o_bias
            attention = _attention(sd, f"{pre}mixer.", with_bias)
            block = {f"self_attn.{k}": v for k, v in attention.items()}
        out.update({f"{to}{k}": v.contiguous() for k, v in block.items()})
    return out
