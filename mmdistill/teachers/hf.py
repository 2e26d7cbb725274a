"""Adapters for Hugging Face decoder-only LMs: Llama (incl. SmolLM2), Mistral, Qwen2, Qwen3,
Phi-3, and InternLM2 (``wqkv`` grouped per KV head, docs/hovle_format.md). All read
``config.json`` as a plain dict, so remote-code models need no ``trust_remote_code``."""

from __future__ import annotations

import re

import torch

from ..decoder import StackConfig
from ..errors import TeacherError
from ..model import LMConfig
from .base import Rule, TeacherAdapter, register_adapter

STRETCHED = ("llama3", "yarn", "longrope")  # RoPE types defined against a pretraining length


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from transformers 4.x (``rope_theta``/``rope_scaling``) or
    5.x (``rope_parameters``) style configs."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in STRETCHED:
        # transformers: a top-level original_max_position_embeddings (Phi-3) wins
        scaling = dict(scaling)
        if "original_max_position_embeddings" in cfg:
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return float(theta), scaling


def stack_from_hf(cfg: dict, name: str = "llm", **overrides) -> StackConfig:
    """A :class:`StackConfig` from the common HF field names."""
    try:
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        theta, scaling = rope_settings(cfg)
        values = dict(
            name=name,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            hidden_act=cfg.get("hidden_act", "silu"),
            sliding_window=None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        )
    except KeyError as exc:
        raise TeacherError(f"config.json lacks {exc.args[0]!r}") from exc
    values.update(overrides)
    try:
        return StackConfig(**values)
    except ValueError as exc:
        raise TeacherError(f"unsupported teacher config: {exc}") from exc


def lm_from_hf(cfg: dict, stack: StackConfig | list[StackConfig], **overrides) -> LMConfig:
    stacks = stack if isinstance(stack, list) else [stack]
    values = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        stacks=stacks,
        final_norm_eps=stacks[0].rms_norm_eps,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )
    values.update(overrides)
    return LMConfig(**values)


LAYER = r"model\.layers\.(\d+)\."
LLAMA_RULES = [
    Rule(r"model\.embed_tokens\.weight", "front.embed_tokens.weight"),
    Rule(LAYER + r"self_attn\.([qkvo])_proj\.(weight|bias)", "layers.{0}.mixer.{1}_proj.{2}"),
    Rule(LAYER + r"mlp\.(gate|up|down)_proj\.(weight|bias)", "layers.{0}.mlp.{1}_proj.{2}"),
    Rule(LAYER + r"input_layernorm\.weight", "layers.{0}.input_norm.weight"),
    Rule(LAYER + r"post_attention_layernorm\.weight", "layers.{0}.post_norm.weight"),
    Rule(LAYER + r"self_attn\.rotary_emb\.inv_freq", None),
    Rule(r"model\.norm\.weight", "norm.weight"),
    Rule(r"lm_head\.weight", "lm_head.weight"),
]


class LlamaAdapter(TeacherAdapter):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    description = "Llama-family decoder (SmolLM2, Llama 2/3, TinyLlama, ...)"

    def lm_config(self, hf_config: dict) -> LMConfig:
        return lm_from_hf(hf_config, stack_from_hf(hf_config))

    def rules(self, hf_config: dict) -> list[Rule]:
        return LLAMA_RULES


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_kinds(cfg: dict, legacy: list[bool]) -> list[str]:
    """Each layer's kind, ``full_attention`` or ``sliding_attention``, as transformers reads
    it: ``cfg["layer_types"]``, or ``legacy[i]`` (layer ``i`` slides) for configs that predate
    ``layer_types``."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        return [LAYER_TYPES[int(sliding)] for sliding in legacy]
    if len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise TeacherError(
            f"config.json's layer_types must list {n} of {', '.join(LAYER_TYPES)}; got {types}"
        )
    return list(types)


def layer_windows(cfg: dict, window: int | None, legacy: list[bool]) -> list[int | None]:
    """Each layer's sliding window: ``window`` on ``sliding_attention`` layers
    (:func:`layer_kinds`), ``None`` (full attention) on the others."""
    return [window if k == "sliding_attention" else None for k in layer_kinds(cfg, legacy)]


def stacks_for_layers(cfg: dict, per_layer: list[dict], **overrides) -> list[StackConfig]:
    """One :class:`StackConfig` per run of consecutive layers with equal ``per_layer`` settings
    (e.g. ``{"sliding_window": 4096}``; a single stack when all layers agree)."""
    runs: list[list[dict]] = []
    for settings in per_layer:
        if runs and runs[-1][0] == settings:
            runs[-1].append(settings)
        else:
            runs.append([settings])
    names = ["llm"] if len(runs) == 1 else [f"llm.{k}" for k in range(len(runs))]
    return [
        stack_from_hf(cfg, name=name, num_layers=len(run), **{**overrides, **run[0]})
        for name, run in zip(names, runs, strict=True)
    ]


def stacks_for_windows(cfg: dict, windows: list[int | None], **overrides) -> list[StackConfig]:
    """:func:`stacks_for_layers` for layers that differ only in their window."""
    return stacks_for_layers(cfg, [{"sliding_window": w} for w in windows], **overrides)


class MistralAdapter(LlamaAdapter):
    name = "mistral"
    architectures = ("MistralForCausalLM",)
    description = "Mistral (sliding-window attention when configured)"

    def lm_config(self, hf_config: dict) -> LMConfig:
        stack = stack_from_hf(hf_config, sliding_window=hf_config.get("sliding_window"))
        return lm_from_hf(hf_config, stack)


class Qwen2Adapter(LlamaAdapter):
    """Qwen2's window applies only when ``use_sliding_window`` is true, and then to the layers
    ``layer_types`` marks ``sliding_attention``; configs without ``layer_types`` mark layers
    ``max_window_layers`` and above (transformers' ``Qwen2Config``)."""

    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    description = "Qwen2 / Qwen2.5 (q/k/v biases; per-layer sliding windows)"

    def lm_config(self, hf_config: dict) -> LMConfig:
        return lm_from_hf(hf_config, self.stacks(hf_config, qkv_bias=True, o_bias=False))

    @staticmethod
    def stacks(hf_config: dict, **overrides) -> list[StackConfig]:
        window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
        first = hf_config.get("max_window_layers", 28)
        legacy = [window is not None and i >= first for i in range(hf_config["num_hidden_layers"])]
        return stacks_for_windows(hf_config, layer_windows(hf_config, window, legacy), **overrides)


class Qwen3Adapter(Qwen2Adapter):
    """Qwen3: Qwen2's layer (and windows) with an RMSNorm on each query and key head before
    RoPE, and biases only when ``attention_bias`` says so. Seeded mixers get the same norms on
    C and B, copied from the teacher."""

    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    description = "Qwen3 (q/k norms; per-layer sliding windows)"

    def lm_config(self, hf_config: dict) -> LMConfig:
        return lm_from_hf(hf_config, self.stacks(hf_config, qk_norm=True))

    def rules(self, hf_config: dict) -> list[Rule]:
        norms = Rule(LAYER + r"self_attn\.([qk])_norm\.weight", "layers.{0}.mixer.{1}_norm.weight")
        return [norms, *LLAMA_RULES]


def rotary_fraction(cfg: dict) -> float:
    """The fraction of each head RoPE rotates (``partial_rotary_factor``, top level or in
    transformers 5's ``rope_parameters``)."""
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)))


class Phi3Adapter(TeacherAdapter):
    """Phi-3 and Phi-4: Llama's layer with q/k/v fused into ``qkv_proj`` (rows q, k, v) and
    gate/up into ``gate_up_proj`` (rows gate, up); a sliding window, when configured, on every
    layer. RoPE on part of each head (Phi-4-mini) is refused."""

    name = "phi3"
    architectures = ("Phi3ForCausalLM",)
    description = "Phi-3 / Phi-4 (fused qkv_proj and gate_up_proj)"

    def lm_config(self, hf_config: dict) -> LMConfig:
        fraction = rotary_fraction(hf_config)
        if fraction != 1.0:
            raise TeacherError(
                f"RoPE on part of each head (partial_rotary_factor {fraction}, e.g. Phi-4-mini) "
                "is not supported: the canonical attention rotates whole heads"
            )
        stack = stack_from_hf(hf_config, sliding_window=hf_config.get("sliding_window"))
        return lm_from_hf(hf_config, stack)

    def rules(self, hf_config: dict) -> list[Rule]:
        stack = stack_from_hf(hf_config)
        q, kv = stack.num_heads * stack.head_dim, stack.num_kv_heads * stack.head_dim

        def qkv(tensor: torch.Tensor, match: re.Match) -> dict[str, torch.Tensor]:
            if tensor.shape[0] != q + 2 * kv:
                raise TeacherError(
                    f"{match.group(0)} has {tensor.shape[0]} rows, expected {q + 2 * kv}"
                )
            parts = tensor.split([q, kv, kv])
            i = match.group(1)
            return {
                f"layers.{i}.mixer.{n}_proj.weight": t for n, t in zip("qkv", parts, strict=True)
            }

        def gate_up(tensor: torch.Tensor, match: re.Match) -> dict[str, torch.Tensor]:
            gate, up = tensor.chunk(2)
            i = match.group(1)
            return {f"layers.{i}.mlp.gate_proj.weight": gate, f"layers.{i}.mlp.up_proj.weight": up}

        return [
            Rule(LAYER + r"self_attn\.qkv_proj\.weight", qkv),
            Rule(LAYER + r"mlp\.gate_up_proj\.weight", gate_up),
            *LLAMA_RULES,
        ]


def split_grouped_wqkv(
    wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused ``wqkv`` (weight ``[rows, hidden]`` or bias ``[rows]``).

    Rows are grouped per KV head: for each KV head, its ``num_heads // num_kv_heads`` query heads,
    then its key, then its value, each ``head_dim`` rows. Query head ``kv * group + j`` is the
    ``j``-th query of KV head ``kv``, the usual GQA convention.
    """
    group = num_heads // num_kv_heads
    rows = num_kv_heads * (group + 2) * head_dim
    if wqkv.shape[0] != rows:
        raise TeacherError(f"wqkv has {wqkv.shape[0]} rows, expected {rows} for this config")
    tail = wqkv.shape[1:]
    w = wqkv.reshape(num_kv_heads, group + 2, head_dim, *tail)
    q = w[:, :group].reshape(num_heads * head_dim, *tail)
    k = w[:, group].reshape(num_kv_heads * head_dim, *tail)
    v = w[:, group + 1].reshape(num_kv_heads * head_dim, *tail)
    return q, k, v


def internlm2_layer_rules(prefix: str, stack: StackConfig, target_offset: int = 0) -> list[Rule]:
    """Rules for InternLM2 decoder layers under ``prefix`` (e.g. ``model.layers.``), writing to
    flat layer ``target_offset + i``."""

    def layer(match: re.Match) -> int:
        return target_offset + int(match.group(1))

    def wqkv(tensor: torch.Tensor, match: re.Match) -> dict[str, torch.Tensor]:
        q, k, v = split_grouped_wqkv(tensor, stack.num_heads, stack.num_kv_heads, stack.head_dim)
        i, kind = layer(match), match.group(2)
        return {
            f"layers.{i}.mixer.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)
        }

    def simple(target: str):
        return lambda tensor, match: {target.format(layer(match), *match.groups()[1:]): tensor}

    p = re.escape(prefix) + r"(\d+)\."
    return [
        Rule(p + r"attention\.wqkv\.(weight|bias)", wqkv),
        Rule(p + r"attention\.wo\.(weight|bias)", simple("layers.{0}.mixer.o_proj.{1}")),
        Rule(p + r"feed_forward\.w1\.(weight|bias)", simple("layers.{0}.mlp.gate_proj.{1}")),
        Rule(p + r"feed_forward\.w3\.(weight|bias)", simple("layers.{0}.mlp.up_proj.{1}")),
        Rule(p + r"feed_forward\.w2\.(weight|bias)", simple("layers.{0}.mlp.down_proj.{1}")),
        Rule(p + r"attention_norm\.(weight)", simple("layers.{0}.input_norm.{1}")),
        Rule(p + r"ffn_norm\.(weight)", simple("layers.{0}.post_norm.{1}")),
        Rule(p + r"attention\.rotary_emb\.inv_freq", None),
    ]


def internlm2_stack(cfg: dict, name: str = "llm") -> StackConfig:
    bias = bool(cfg.get("bias", cfg.get("attention_bias", False)))
    return stack_from_hf(cfg, name=name, qkv_bias=bias, o_bias=bias)


class InternLM2Adapter(TeacherAdapter):
    name = "internlm2"
    architectures = ("InternLM2ForCausalLM",)
    description = "InternLM2 (fused wqkv grouped per KV head)"

    def lm_config(self, hf_config: dict) -> LMConfig:
        return lm_from_hf(hf_config, internlm2_stack(hf_config))

    def rules(self, hf_config: dict) -> list[Rule]:
        stack = internlm2_stack(hf_config)
        return [
            Rule(r"model\.tok_embeddings\.weight", "front.embed_tokens.weight"),
            *internlm2_layer_rules("model.layers.", stack),
            Rule(r"model\.norm\.weight", "norm.weight"),
            Rule(r"output\.weight", "lm_head.weight"),
        ]


for _adapter in (
    LlamaAdapter(),
    MistralAdapter(),
    Qwen2Adapter(),
    Qwen3Adapter(),
    Phi3Adapter(),
    InternLM2Adapter(),
):
    register_adapter(_adapter)
