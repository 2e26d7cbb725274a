"""Tiny random HoVLE-format checkpoints for tests.

:func:`write_tiny_hovle` writes a directory laid out like ``OpenGVLab/HoVLE``: ``config.json``
(``internvl_chat`` with ``embedding_config`` and ``llm_config``), ``model.safetensors`` with every
HoVLE tensor name at its HoVLE shape (random values), and an InternLM2-style sentencepiece
``tokenizer.model`` with ``tokenizer_config.json`` and ``special_tokens_map.json``. Everything is
a deterministic function of the arguments (same seed, same bytes).

The files are written by :mod:`mmdistill.teachers.hovle_export` (the fused attention projection
in HoVLE's layout, grouped per KV head). Which config keys are verified against HoVLE's sources
and which are reconstructed is recorded in ``docs/hovle_format.md``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from torch import Tensor

from ..frontends.hovle_image import IMG_CONTEXT_TOKEN
from ..frontends.hovle_vision import num_image_tokens
from .hovle_export import (
    HoVLESizes,
    hovle_config,
    pack_wqkv_grouped,
    train_sentencepiece,
    write_hovle_directory,
)

__all__ = ["tiny_hovle_state_dict", "write_tiny_hovle"]

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


def _train_tokenizer(vocab_size: int) -> bytes:
    """The fixture's tokenizer, trained on a few fixed lines."""
    return train_sentencepiece(_TRAINING_TEXT * 4, vocab_size)


def _layer_tensors(
    prefix: str, s: HoVLESizes, gen: torch.Generator, dtype: torch.dtype
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
    sizes: HoVLESizes, llm_vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32
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
        **sizes: Overrides of :class:`HoVLESizes` fields.

    Returns:
        Facts about what was written: ``sizes`` (dict), ``llm_vocab_size``, ``vocab_size`` (LLM
        rows, specials included), ``img_context_token_id``, ``num_image_token``,
        ``special_token_maps`` and ``path``.

    Raises:
        TypeError: On an unknown size name.
    """
    unknown = set(sizes) - set(HoVLESizes.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"unknown size(s) {sorted(unknown)}; known: {sorted(HoVLESizes.__dataclass_fields__)}"
        )
    s = HoVLESizes(**sizes)
    proto = _train_tokenizer(s.tokenizer_vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    llm_vocab_size = sp.get_piece_size()
    img_context_token_id = sp.piece_to_id(IMG_CONTEXT_TOKEN)
    special_token_maps = {
        f"<special_{i}>": llm_vocab_size + i for i in range(s.num_special_text_tokens)
    }
    torch_dtype = str(dtype).removeprefix("torch.")
    config = hovle_config(s, llm_vocab_size, img_context_token_id, special_token_maps, torch_dtype)
    tensors = tiny_hovle_state_dict(s, llm_vocab_size, seed=seed, dtype=dtype)
    out = write_hovle_directory(directory, config, tensors, proto, special_token_maps)
    return {
        "path": str(out),
        "sizes": asdict(s),
        "llm_vocab_size": llm_vocab_size,
        "vocab_size": llm_vocab_size + s.num_special_text_tokens,
        "img_context_token_id": img_context_token_id,
        "num_image_token": num_image_tokens(s.image_size, s.patch_size, s.downsample_ratio),
        "special_token_maps": special_token_maps,
    }
