"""Tiny random HoVLE-format checkpoints for tests.

:func:`write_tiny_hovle` writes a directory laid out like ``OpenGVLab/HoVLE``: ``config.json``
(``internvl_chat`` with ``embedding_config`` and ``llm_config``), ``model.safetensors`` with every
HoVLE tensor name at its HoVLE shape (random values), and an InternLM2-style sentencepiece
``tokenizer.model`` with ``tokenizer_config.json`` and ``special_tokens_map.json``. Everything is
a deterministic function of the arguments (same seed, same bytes).

The fused attention projection is written in HoVLE's layout, grouped per KV head (see
:func:`pack_wqkv_grouped`). Which config keys are verified against HoVLE's sources and which are
reconstructed is recorded in ``docs/hovle_format.md``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from torch import Tensor

from mmdistill.frontends.hovle_image import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from mmdistill.frontends.hovle_vision import num_image_tokens

__all__ = [
    "TINY_SPECIAL_TOKENS",
    "TinyHoVLESizes",
    "pack_wqkv_grouped",
    "tiny_hovle_state_dict",
    "write_tiny_hovle",
]

TINY_SPECIAL_TOKENS = (
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
)
"""User-defined sentencepiece symbols of the fixture tokenizer (ids 3..7, after unk/bos/eos)."""

_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "A small red square sits on a blue background.",
    "Please describe the image shortly.",
    "There are three circles and one triangle in the picture.",
    "What colour is the large shape on the left?",
    "The cat is sleeping on a green sofa next to the window.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f g.",
    "<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat is in the image?<|im_end|>",
    "<|im_start|>assistant\nA dog running on the grass.<|im_end|>",
)


@dataclass(frozen=True)
class TinyHoVLESizes:
    """Sizes of the fixture (HoVLE-2.6B values in brackets).

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
    attn_implementation: str = "flash_attention_2"
    template: str = "internlm2-chat"

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_attention_heads


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


def train_sentencepiece(lines: Sequence[str], vocab_size: int) -> bytes:
    """Train an InternLM2-style BPE sentencepiece model in memory (unk 0, bos 1, eos 2, the
    image and chat special tokens as user-defined symbols, byte fallback, no normalisation)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        user_defined_symbols=list(TINY_SPECIAL_TOKENS),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def _train_tokenizer(vocab_size: int) -> bytes:
    """The fixture's tokenizer, trained on a few fixed lines."""
    return train_sentencepiece(_TRAINING_TEXT * 4, vocab_size)


def _layer_tensors(
    prefix: str, s: TinyHoVLESizes, gen: torch.Generator, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Random tensors of one InternLM2 decoder layer under ``prefix``."""
    h, hd, inter = s.hidden_size, s.head_dim, s.intermediate_size

    def normal(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def norm_weight() -> Tensor:
        return (1.0 + 0.1 * torch.randn(h, generator=gen)).to(dtype)

    q = normal(s.num_attention_heads * hd, h)
    k = normal(s.num_key_value_heads * hd, h)
    v = normal(s.num_key_value_heads * hd, h)
    return {
        f"{prefix}attention.wqkv.weight": pack_wqkv_grouped(q, k, v, s.num_key_value_heads),
        f"{prefix}attention.wo.weight": normal(h, s.num_attention_heads * hd),
        f"{prefix}feed_forward.w1.weight": normal(inter, h),
        f"{prefix}feed_forward.w3.weight": normal(inter, h),
        f"{prefix}feed_forward.w2.weight": normal(h, inter),
        f"{prefix}attention_norm.weight": norm_weight(),
        f"{prefix}ffn_norm.weight": norm_weight(),
    }


def tiny_hovle_state_dict(
    sizes: TinyHoVLESizes, llm_vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Every HoVLE tensor, random, at HoVLE's names and shapes.

    Args:
        sizes: Model sizes.
        llm_vocab_size: Rows of the text tables (the tokenizer's vocabulary size).
        seed: Seed of the values.
        dtype: Tensor dtype.

    Returns:
        State dict with ``embedding_model.*`` and ``language_model.*`` keys.
    """
    s = sizes
    gen = torch.Generator().manual_seed(seed)
    h = s.hidden_size
    grid = s.image_size // s.patch_size
    k = round(1 / s.downsample_ratio)
    vocab = llm_vocab_size + s.num_special_text_tokens

    def normal(*shape: int, std: float = 0.02) -> Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    e = "embedding_model."
    tensors: dict[str, Tensor] = {
        f"{e}vision_embeddings.class_embedding": normal(1, 1, h),
        f"{e}vision_embeddings.patch_embedding.weight": normal(h, 3, s.patch_size, s.patch_size),
        f"{e}vision_embeddings.patch_embedding.bias": normal(h),
        f"{e}vision_embeddings.position_embedding": normal(1, 1 + grid * grid, h),
        f"{e}llm_text_embeddings.weight": normal(llm_vocab_size, h),
    }
    if s.num_special_text_tokens:
        tensors[f"{e}special_text_embeddings.weight"] = normal(s.num_special_text_tokens, h)
    for i in range(s.num_embedding_layers):
        tensors.update(_layer_tensors(f"{e}encoder.{i}.", s, gen, dtype))
    tensors.update(
        {
            f"{e}pixel_shuffle_proj.0.weight": normal(h, h * k * k),
            f"{e}pixel_shuffle_proj.0.bias": normal(h),
            f"{e}pixel_shuffle_proj.2.weight": normal(h, h),
            f"{e}pixel_shuffle_proj.2.bias": normal(h),
        }
    )
    m = "language_model.model."
    tensors[f"{m}tok_embeddings.weight"] = normal(vocab, h)
    for i in range(s.num_llm_layers):
        tensors.update(_layer_tensors(f"{m}layers.{i}.", s, gen, dtype))
    tensors[f"{m}norm.weight"] = (1.0 + 0.1 * torch.randn(h, generator=gen)).to(dtype)
    tensors["language_model.output.weight"] = normal(vocab, h)
    return tensors


def _hovle_config(
    s: TinyHoVLESizes,
    llm_vocab_size: int,
    img_context_token_id: int,
    special_token_maps: dict[str, int],
    torch_dtype: str,
) -> dict[str, Any]:
    """``config.json`` in HoVLE's layout."""
    embedding_config = {
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
    llm_config = {
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
        "vocab_size": llm_vocab_size + s.num_special_text_tokens,
    }
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": s.downsample_ratio,
        "dynamic_image_size": True,
        "embedding_config": embedding_config,
        "force_image_size": s.image_size,
        "llm_config": llm_config,
        "max_dynamic_patch": s.max_dynamic_patch,
        "min_dynamic_patch": s.min_dynamic_patch,
        "model_type": "internvl_chat",
        "normalize_encoder_output": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": s.template,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.37.2",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
    }


def _token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _tokenizer_files(
    sp: spm.SentencePieceProcessor, special_token_maps: dict[str, int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` (InternLM2Tokenizer layout)."""
    decoder = {str(i): _token_entry(sp.id_to_piece(i)) for i in range(3)}
    for token in TINY_SPECIAL_TOKENS:
        decoder[str(sp.piece_to_id(token))] = _token_entry(token)
    for token, token_id in special_token_maps.items():
        decoder[str(token_id)] = _token_entry(token)
    additional = [*TINY_SPECIAL_TOKENS, *special_token_maps]
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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_tiny_hovle(
    directory: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **sizes: Any,
) -> dict[str, Any]:
    """Write a tiny random HoVLE-format checkpoint directory.

    Args:
        directory: Target directory (created if missing; existing files are overwritten).
        seed: Seed of the weights (the tokenizer is seed-independent).
        dtype: Weight dtype.
        **sizes: Overrides of :class:`TinyHoVLESizes` fields.

    Returns:
        Facts about what was written: ``sizes`` (dict), ``llm_vocab_size``, ``vocab_size`` (LLM
        rows, specials included), ``img_context_token_id``, ``num_image_token``,
        ``special_token_maps`` and ``path``.

    Raises:
        TypeError: On an unknown size name.
    """
    unknown = set(sizes) - set(TinyHoVLESizes.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"unknown size(s) {sorted(unknown)}; known: {sorted(TinyHoVLESizes.__dataclass_fields__)}"
        )
    s = TinyHoVLESizes(**sizes)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    proto = _train_tokenizer(s.tokenizer_vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    llm_vocab_size = sp.get_piece_size()
    img_context_token_id = sp.piece_to_id(IMG_CONTEXT_TOKEN)
    special_token_maps = {
        f"<special_{i}>": llm_vocab_size + i for i in range(s.num_special_text_tokens)
    }
    torch_dtype = str(dtype).removeprefix("torch.")

    (out / "tokenizer.model").write_bytes(proto)
    tokenizer_config, special_tokens_map = _tokenizer_files(sp, special_token_maps)
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special_tokens_map)
    _write_json(
        out / "config.json",
        _hovle_config(s, llm_vocab_size, img_context_token_id, special_token_maps, torch_dtype),
    )
    _write_json(
        out / "generation_config.json",
        {"_from_model_config": True, "transformers_version": "4.37.2"},
    )
    tensors = tiny_hovle_state_dict(s, llm_vocab_size, seed=seed, dtype=dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return {
        "path": str(out),
        "sizes": asdict(s),
        "llm_vocab_size": llm_vocab_size,
        "vocab_size": llm_vocab_size + s.num_special_text_tokens,
        "img_context_token_id": img_context_token_id,
        "num_image_token": num_image_tokens(s.image_size, s.patch_size, s.downsample_ratio),
        "special_token_maps": special_token_maps,
    }
