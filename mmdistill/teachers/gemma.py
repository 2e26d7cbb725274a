"""Adapters for Gemma 2 and Gemma 3 (text) checkpoints.

What sets Gemma apart from Llama, and how the canonical model expresses it:

* RMSNorms scale by ``1 + w``: the rules store ``1 + w`` (exact in float32);
* sandwich norms: the attention and MLP outputs are normalised too before each residual add
  (``sandwich_norms``: ``post_mixer_norm``, ``post_mlp_norm``); ``pre_feedforward_layernorm`` is
  the canonical ``post_norm``;
* token embeddings times ``sqrt(hidden_size)`` (the text front-end's ``embedding_scale``), and
  tied embeddings by default;
* attention scores scaled by ``query_pre_attn_scalar ** -0.5``; Gemma 2 also soft-caps them
  (``attn_logit_softcapping``) and the final logits (``final_logit_softcapping``);
* a GeGLU MLP (``hidden_activation``);
* sliding-window and global layers by ``layer_types`` (older configs: Gemma 2 alternates starting
  with a sliding layer, Gemma 3 makes every sixth layer global), one stack per run of layers;
* Gemma 3: RMSNorms on each query and key head, and its own RoPE base (and scaling) for the
  sliding and the global layers.
"""

from __future__ import annotations

from ..errors import TeacherError
from ..model import LMConfig
from .base import Rule, TeacherAdapter, register_adapter
from .hf import LAYER, layer_kinds, layer_windows, lm_from_hf, stacks_for_layers, stacks_for_windows


def _one_plus(target: str):
    """A rule target storing ``1 + w`` (Gemma's norm weight) under ``target``."""
    return lambda tensor, match: {target.format(*match.groups()): tensor + 1.0}


def _rules(qk_norm: bool) -> list[Rule]:
    rules = [
        Rule(r"model\.embed_tokens\.weight", "front.embed_tokens.weight"),
        Rule(LAYER + r"self_attn\.([qkvo])_proj\.(weight|bias)", "layers.{0}.mixer.{1}_proj.{2}"),
        Rule(LAYER + r"mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}_proj.weight"),
        Rule(LAYER + r"input_layernorm\.weight", _one_plus("layers.{0}.input_norm.weight")),
        Rule(
            LAYER + r"post_attention_layernorm\.weight",
            _one_plus("layers.{0}.post_mixer_norm.weight"),
        ),
        Rule(
            LAYER + r"pre_feedforward_layernorm\.weight", _one_plus("layers.{0}.post_norm.weight")
        ),
        Rule(
            LAYER + r"post_feedforward_layernorm\.weight",
            _one_plus("layers.{0}.post_mlp_norm.weight"),
        ),
        Rule(r"model\.norm\.weight", _one_plus("norm.weight")),
        Rule(r"lm_head\.weight", "lm_head.weight"),
    ]
    if qk_norm:
        rules.append(
            Rule(
                LAYER + r"self_attn\.([qk])_norm\.weight",
                _one_plus("layers.{0}.mixer.{1}_norm.weight"),
            )
        )
    return rules


def _common(cfg: dict) -> dict:
    """Stack settings every Gemma layer shares."""
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=cfg.get("attn_logit_softcapping"),
        sandwich_norms=True,
        qkv_bias=bias,
        o_bias=bias,
    )


def _lm(cfg: dict, stacks) -> LMConfig:
    return lm_from_hf(
        cfg,
        stacks,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        front_end={"type": "text", "embedding_scale": float(cfg["hidden_size"]) ** 0.5},
        final_logit_softcap=cfg.get("final_logit_softcapping"),
    )


class Gemma2Adapter(TeacherAdapter):
    name = "gemma2"
    architectures = ("Gemma2ForCausalLM",)
    description = "Gemma 2 (sandwich norms, soft-capping, alternating sliding windows)"

    def lm_config(self, hf_config: dict) -> LMConfig:
        n = hf_config["num_hidden_layers"]
        windows = layer_windows(
            hf_config, hf_config.get("sliding_window"), [i % 2 == 0 for i in range(n)]
        )
        return _lm(hf_config, stacks_for_windows(hf_config, windows, **_common(hf_config)))

    def rules(self, hf_config: dict) -> list[Rule]:
        return _rules(qk_norm=False)


def gemma3_rope(cfg: dict, kind: str) -> dict:
    """``rope_theta`` and ``rope_scaling`` of Gemma 3's ``full_attention`` or
    ``sliding_attention`` layers (transformers 5's per-kind ``rope_parameters``, or the older
    ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``)."""
    params = (cfg.get("rope_parameters") or {}).get(kind)
    if params is None:
        local = kind == "sliding_attention"
        theta = cfg.get("rope_local_base_freq", 10_000.0) if local else cfg.get("rope_theta", 1e6)
        params = {"rope_theta": theta, **({} if local else cfg.get("rope_scaling") or {})}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return {"rope_theta": float(params.get("rope_theta", 10_000.0)), "rope_scaling": scaling}


class Gemma3TextAdapter(TeacherAdapter):
    name = "gemma3"
    architectures = ("Gemma3ForCausalLM",)
    description = "Gemma 3 text (q/k norms, sandwich norms, local/global RoPE and windows)"

    def lm_config(self, hf_config: dict) -> LMConfig:
        if hf_config.get("use_bidirectional_attention"):
            raise TeacherError("Gemma 3 with bidirectional attention (an encoder) is not a decoder")
        n = hf_config["num_hidden_layers"]
        every = hf_config.get("sliding_window_pattern", 6)
        window = hf_config.get("sliding_window")
        kinds = layer_kinds(hf_config, [bool((i + 1) % every) for i in range(n)])
        per_layer = [
            {
                "sliding_window": window if kind == "sliding_attention" else None,
                **gemma3_rope(hf_config, kind),
            }
            for kind in kinds
        ]
        stacks = stacks_for_layers(hf_config, per_layer, qk_norm=True, **_common(hf_config))
        return _lm(hf_config, stacks)

    def rules(self, hf_config: dict) -> list[Rule]:
        return _rules(qk_norm=True)


for _adapter in (Gemma2Adapter(), Gemma3TextAdapter()):
    register_adapter(_adapter)
