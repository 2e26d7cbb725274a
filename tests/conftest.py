"""Shared fixtures: tiny deterministic teachers built on the fly (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The test models are tiny: one thread avoids oversubscription on CI's two cores (and next to
# the DeepSpeed worker processes some tests start), which is several times faster here.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_hf_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    kwargs.update(overrides)
    return kwargs


def write_hf_model(directory, family: str = "llama", seed: int = 0, **overrides):
    """Save a random transformers model of ``family`` to ``directory``; returns the model."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**tiny_hf_kwargs(**overrides))).eval()
    # Random biases/norm weights so mapping mistakes cannot hide behind zeros and ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(directory))
    return model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    write_hf_model(directory, "llama")
    return directory


@pytest.fixture(scope="session")
def llama_teacher(llama_dir):
    from mmdistill import load_teacher

    return load_teacher(str(llama_dir))


@pytest.fixture(scope="module")
def hovle():
    """The random tiny HoVLE-format teacher (built on first use into the cache)."""
    from mmdistill import load_teacher

    return load_teacher("builtin:tiny-hovle")
