"""Writing HoVLE-format directories: the inverse of :class:`~mmdistill.teachers.hovle.HoVLEAdapter`.

A HoVLE-format directory holds ``config.json`` (``internvl_chat`` with ``embedding_config`` and
``llm_config``; :func:`hovle_config`), ``generation_config.json``, ``model.safetensors`` under
HoVLE's tensor names, and an InternLM2-style sentencepiece tokenizer (``tokenizer.model``,
``tokenizer_config.json``, ``special_tokens_map.json``; :func:`train_sentencepiece`,
:func:`tokenizer_files`). :func:`write_hovle_directory` writes all of them.

:func:`to_hovle_state_dict` renames a canonical :class:`~mmdistill.model.DecoderLM`'s weights to
HoVLE's, undoing the adapter's rules: flat layers ``0..E-1`` go back to the embedding module,
the rest to the LLM, and ``q/k/v_proj`` are fused into ``wqkv`` grouped per KV head
(:func:`pack_wqkv_grouped`, the inverse of :func:`~mmdistill.teachers.hf.split_grouped_wqkv`).
So ``load_teacher`` of the written directory rebuilds the same model.

Users: the tiny random fixture (:mod:`mmdistill.teachers.tiny_hovle`) and the demo teacher's
builder (:mod:`mmdistill.demo.teacher_builder`). Which config keys are verified against HoVLE's
sources and which are reconstructed: ``docs/hovle_format.md``.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from torch import Tensor

from ..files import atomic_write_bytes, atomic_write_text
from ..frontends.hovle_image import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from ..model import DecoderLM

__all__ = [
    "SPECIAL_TOKENS",
    "HoVLESizes",
    "hovle_config",
    "pack_wqkv_grouped",
    "to_hovle_state_dict",
    "tokenizer_files",
    "train_sentencepiece",
    "write_hovle_directory",
    "write_json",
    "write_tokenizer",
]

SPECIAL_TOKENS = (
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
)
"""Special tokens of the written tokenizers: user-defined sentencepiece symbols with ids 3..7
(after unk/bos/eos), listed in ``tokenizer_config.json`` as additional special tokens."""

_TRANSFORMERS_VERSION = "4.37.2"


@dataclass(frozen=True)
class HoVLESizes:
    """Sizes of a HoVLE-format model (defaults: the tiny fixture; HoVLE-2.6B in brackets).

    Attributes:
        hidden_size: Width of both stacks [2048].
        num_attention_heads: Query heads [16].
        num_key_value_heads: KV heads [8].
        intermediate_size: MLP width [8192].
        num_embedding_layers: Layers of the holistic embedding module [8].
        num_llm_layers: LLM layers [24].
        image_size: Tile side [448].
        patch_size: Patch side [14].
        downsample_ratio: Pixel-shuffle ratio [0.5].
        tokenizer_vocab_size: Target sentencepiece vocabulary (a soft limit) [92544 + 9 added].
        num_special_text_tokens: Rows of ``special_text_embeddings`` (ids after the tokenizer
            vocabulary); 0 writes no such table [unverified for HoVLE, probably 0].
        rms_norm_eps: RMSNorm epsilon [1e-5].
        rope_theta: RoPE base of both stacks [1e6].
        llm_rope_scaling: ``llm_config.rope_scaling`` [InternVL2-2B: dynamic, factor 2].
        embedding_rope_scaling: ``embedding_config.rope_scaling`` [unverified].
        max_dynamic_patch: Most tiles [12].
        min_dynamic_patch: Fewest tiles [1].
        dynamic_image_size: Tile images dynamically [True].
        use_thumbnail: Add a thumbnail tile to multi-tile images [True].
        attn_implementation: Written into both sub-configs ["flash_attention_2"].
        template: Chat template name ["internlm2-chat", unverified].
    """

    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    num_embedding_layers: int = 2
    num_llm_layers: int = 2
    image_size: int = 56
    patch_size: int = 14
    downsample_ratio: float = 0.5
    tokenizer_vocab_size: int = 384
    num_special_text_tokens: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    llm_rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {"factor": 2.0, "type": "dynamic"}
    )
    embedding_rope_scaling: dict[str, Any] | None = None
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    attn_implementation: str = "flash_attention_2"
    template: str = "internlm2-chat"

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_attention_heads


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def pack_wqkv_grouped(q: Tensor, k: Tensor, v: Tensor, num_key_value_heads: int) -> Tensor:
    """Fuse separate projections into InternLM2's ``wqkv`` (grouped per KV head).

    Output rows are ``[kv_heads, q_per_kv + 2, head_dim]`` flattened: for each KV head its
    query heads, then its key head, then its value head.

    Args:
        q: Query weight ``[heads*head_dim, hidden]``.
        k: Key weight ``[kv_heads*head_dim, hidden]``.
        v: Value weight ``[kv_heads*head_dim, hidden]``.
        num_key_value_heads: KV heads.

    Returns:
        ``[(heads + 2*kv_heads)*head_dim, hidden]``.
    """
    kv = num_key_value_heads
    hidden = q.shape[1]
    head_dim = k.shape[0] // kv
    q_per_kv = q.shape[0] // (kv * head_dim)
    groups = torch.cat(
        [
            q.reshape(kv, q_per_kv, head_dim, hidden),
            k.reshape(kv, 1, head_dim, hidden),
            v.reshape(kv, 1, head_dim, hidden),
        ],
        dim=1,
    )
    return groups.reshape(-1, hidden).contiguous()


_LAYER_PARTS = {
    "mixer.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_norm.weight": "attention_norm.weight",
    "post_norm.weight": "ffn_norm.weight",
}
_FRONT = re.compile(
    r"front\.((?:vision_embeddings|llm_text_embeddings|special_text_embeddings"
    r"|pixel_shuffle_proj)\..+)"
)
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_QKV = re.compile(r"mixer\.([qkv])_proj\.weight")


def to_hovle_state_dict(model: DecoderLM) -> dict[str, Tensor]:
    """The model's weights under HoVLE's names: the inverse of the HoVLE adapter's rules.

    Flat layers ``0..E-1`` become ``embedding_model.encoder.{i}``, the rest
    ``language_model.model.layers.{i - E}``; ``q/k/v_proj`` are fused into ``wqkv`` grouped per
    KV head. HoVLE's unused ``language_model.model.tok_embeddings`` is written as a copy of the
    text embeddings (the adapter drops it).

    Args:
        model: An all-attention, bias-free :class:`~mmdistill.model.DecoderLM` with the HoVLE
            front-end and two stacks (embedding module, LLM).

    Returns:
        ``{HoVLE key: tensor}`` (detached clones).

    Raises:
        ValueError: If the model is not shaped like a HoVLE teacher or a key has no HoVLE name.
    """
    config = model.config
    if config.front_end.get("type") != "hovle" or len(config.stacks) != 2:
        raise ValueError("to_hovle_state_dict needs a HoVLE-front-end model with two stacks")
    if any(kind != "attention" for kind in config.layer_types):
        raise ValueError("only all-attention (teacher) models have a HoVLE layout")
    emb_stack, llm_stack = config.stacks
    out: dict[str, Tensor] = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        front, layer = _FRONT.fullmatch(key), _LAYER.fullmatch(key)
        if front:
            out[f"embedding_model.{front.group(1)}"] = tensor
        elif key == "norm.weight":
            out["language_model.model.norm.weight"] = tensor
        elif key == "lm_head.weight":
            out["language_model.output.weight"] = tensor
        elif layer and _QKV.fullmatch(layer.group(2)):
            qkv.setdefault(int(layer.group(1)), {})[layer.group(2)[6]] = tensor
        elif layer and layer.group(2) in _LAYER_PARTS:
            prefix = _hovle_layer_prefix(int(layer.group(1)), emb_stack.num_layers)
            out[prefix + _LAYER_PARTS[layer.group(2)]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"weights without a HoVLE name: {sorted(unknown)}")
    for i, parts in qkv.items():
        stack = emb_stack if i < emb_stack.num_layers else llm_stack
        prefix = _hovle_layer_prefix(i, emb_stack.num_layers)
        out[prefix + "attention.wqkv.weight"] = pack_wqkv_grouped(
            parts["q"], parts["k"], parts["v"], stack.num_kv_heads
        )
    text = out["embedding_model.llm_text_embeddings.weight"]
    out["language_model.model.tok_embeddings.weight"] = text.clone()
    return out


def _hovle_layer_prefix(index: int, num_embedding_layers: int) -> str:
    if index < num_embedding_layers:
        return f"embedding_model.encoder.{index}."
    return f"language_model.model.layers.{index - num_embedding_layers}."


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def _embedding_config(
    s: HoVLESizes,
    llm_vocab_size: int,
    img_context_token_id: int,
    special_token_maps: dict[str, int],
    torch_dtype: str,
) -> dict[str, Any]:
    return {
        "model_type": "holistic_embedding",
        "num_hidden_layers": s.num_embedding_layers,
        "initializer_factor": 1e-5,
        "use_autoregressive_loss": False,
        "num_channels": 3,
        "patch_size": s.patch_size,
        "image_size": s.image_size,
        "hidden_size": s.hidden_size,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": 32768,
        "rope_theta": s.rope_theta,
        "rope_scaling": s.embedding_rope_scaling,
        "intermediate_size": s.intermediate_size,
        "mlp_bias": False,
        "hidden_act": "silu",
        "rms_norm_eps": s.rms_norm_eps,
        "pretraining_tp": 1,
        "use_ls": False,
        "use_img_start_end_tokens": True,
        "special_token_maps": special_token_maps,
        "llm_vocab_size": llm_vocab_size,
        "llm_hidden_size": s.hidden_size,
        "attn_implementation": s.attn_implementation,
        "downsample_ratio": s.downsample_ratio,
        "img_context_token_id": img_context_token_id,
        "pixel_shuffle_loc": "pre",
        "use_pixel_shuffle_proj": True,
        "torch_dtype": torch_dtype,
    }


def _llm_config(s: HoVLESizes, vocab_size: int, torch_dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": s.attn_implementation,
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": 32768,
        "model_type": "internlm2",
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_llm_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "pad_token_id": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": s.rms_norm_eps,
        "rope_scaling": s.llm_rope_scaling,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def hovle_config(
    sizes: HoVLESizes,
    llm_vocab_size: int,
    img_context_token_id: int,
    special_token_maps: dict[str, int] | None = None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """``config.json`` in HoVLE's layout.

    Args:
        sizes: Model sizes and image settings.
        llm_vocab_size: Rows of the text embedding table (the tokenizer's vocabulary).
        img_context_token_id: Id of ``<IMG_CONTEXT>``.
        special_token_maps: ``{token: id}`` of the special text tokens after the vocabulary
            (one per row of ``special_text_embeddings``).
        torch_dtype: Dtype name of the weights.

    Returns:
        The config as a dict.
    """
    s = sizes
    special_token_maps = special_token_maps or {}
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": s.downsample_ratio,
        "dynamic_image_size": s.dynamic_image_size,
        "embedding_config": _embedding_config(
            s, llm_vocab_size, img_context_token_id, special_token_maps, torch_dtype
        ),
        "force_image_size": s.image_size,
        "llm_config": _llm_config(s, llm_vocab_size + s.num_special_text_tokens, torch_dtype),
        "max_dynamic_patch": s.max_dynamic_patch,
        "min_dynamic_patch": s.min_dynamic_patch,
        "model_type": "internvl_chat",
        "normalize_encoder_output": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": s.template,
        "torch_dtype": torch_dtype,
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": s.use_thumbnail,
    }


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_sentencepiece(
    lines: Sequence[str], vocab_size: int, space_after_newline: bool = False
) -> bytes:
    """Train an InternLM2-style BPE sentencepiece model in memory.

    unk 0, bos 1, eos 2, then :data:`SPECIAL_TOKENS` as user-defined symbols; byte fallback, no
    normalisation.

    Args:
        lines: Training text.
        vocab_size: Target vocabulary (a soft limit).
        space_after_newline: Normalise every newline to a newline and a space, so a word after a
            newline starts a sentencepiece word (``\nred`` is ``\n``, ``▁red``: the same token
            as ``red`` inside a sentence), and text ending in a newline tokenises as a prefix of
            that text plus what follows. Decoding then shows a space after each newline.

    Returns:
        The serialised model.
    """
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        if space_after_newline:
            rules = Path(tmp) / "rules.tsv"
            rules.write_text("A\tA 20\n")  # code points in hex: U+000A -> U+000A U+0020
            normalization = {"normalization_rule_tsv": str(rules)}
        else:
            normalization = {"normalization_rule_name": "identity"}
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            user_defined_symbols=list(SPECIAL_TOKENS),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            byte_fallback=True,
            character_coverage=1.0,
            num_threads=1,
            minloglevel=2,
            **normalization,
        )
    return _without_rule_path(buffer.getvalue())


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _proto_fields(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """``(field number, key bytes, value bytes)`` of a serialised protobuf message, in order."""
    fields, i = [], 0
    while i < len(data):
        start = i
        key, i = _read_varint(data, i)
        wire = key & 7
        if wire == 0:
            _, end = _read_varint(data, i)
        elif wire == 2:
            length, i = _read_varint(data, i)
            end = i + length
        else:
            end = i + {1: 8, 5: 4}[wire]
        fields.append((key >> 3, data[start:i], data[i:end]))
        i = end
    return fields


def _without_rule_path(model: bytes) -> bytes:
    """``model`` without ``normalizer_spec.normalization_rule_tsv``.

    That field (ModelProto field 3, NormalizerSpec field 6) holds the path of the rules file read
    during training, a temporary name; tokenisation uses only the compiled rules
    (``precompiled_charsmap``). Dropping it keeps the model a function of its training text.
    """
    out = bytearray()
    for number, key, value in _proto_fields(model):
        if number == 3:
            inner = b"".join(k + v for n, k, v in _proto_fields(value) if n != 6)
            out += bytes([key[0]]) + _varint(len(inner)) + inner
        else:
            out += key + value
    return bytes(out)


def _token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_files(
    sp: spm.SentencePieceProcessor, special_token_maps: dict[str, int] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` (InternLM2Tokenizer layout).

    Args:
        sp: The sentencepiece model (trained by :func:`train_sentencepiece`).
        special_token_maps: Special text tokens after the vocabulary, ``{token: id}``.

    Returns:
        The two files' contents.
    """
    special_token_maps = special_token_maps or {}
    decoder = {str(i): _token_entry(sp.id_to_piece(i)) for i in range(3)}
    for token in SPECIAL_TOKENS:
        decoder[str(sp.piece_to_id(token))] = _token_entry(token)
    for token, token_id in special_token_maps.items():
        decoder[str(token_id)] = _token_entry(token)
    additional = [*SPECIAL_TOKENS, *special_token_maps]
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 8192,
        "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    special_tokens_map = {
        "additional_special_tokens": additional,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
    }
    return tokenizer_config, special_tokens_map


def write_tokenizer(
    directory: str | Path, tokenizer_model: bytes, special_token_maps: dict[str, int] | None = None
) -> Path:
    """Write ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Returns:
        The directory (created if missing).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    tokenizer_config, special_tokens_map = tokenizer_files(sp, special_token_maps)
    atomic_write_bytes(out / "tokenizer.model", tokenizer_model)
    write_json(out / "tokenizer_config.json", tokenizer_config)
    write_json(out / "special_tokens_map.json", special_tokens_map)
    return out


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON with a final newline (atomically)."""
    atomic_write_text(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# The directory
# --------------------------------------------------------------------------------------------


def write_hovle_directory(
    directory: str | Path,
    hf_config: dict[str, Any],
    tensors: dict[str, Tensor],
    tokenizer_model: bytes,
    special_token_maps: dict[str, int] | None = None,
) -> Path:
    """Write a HoVLE-format directory.

    Files: ``config.json``, ``generation_config.json``, ``model.safetensors``,
    ``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json`` (existing files
    of those names are replaced).

    Args:
        directory: Target directory (created if missing).
        hf_config: ``config.json`` (:func:`hovle_config`).
        tensors: Weights under HoVLE's names (:func:`to_hovle_state_dict`), written as given.
        tokenizer_model: Serialised sentencepiece model (:func:`train_sentencepiece`).
        special_token_maps: Special text tokens after the vocabulary, ``{token: id}``.

    Returns:
        The directory.
    """
    out = write_tokenizer(directory, tokenizer_model, special_token_maps)
    write_json(out / "config.json", hf_config)
    write_json(
        out / "generation_config.json",
        {"_from_model_config": True, "transformers_version": _TRANSFORMERS_VERSION},
    )
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
