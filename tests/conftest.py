"""Shared fixtures: tiny deterministic teachers built on the fly (no downloads)."""

from __future__ import annotations

import os
import string
from pathlib import Path

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


ROOT_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def run_cli(monkeypatch, capfd, *args: str) -> tuple[int, str, str]:
    """``mmdistill ARGS`` in this process: (exit code, stdout, stderr with whitespace folded)."""
    import sys

    from mmdistill.cli import main

    monkeypatch.setattr(sys, "argv", ["mmdistill", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capfd.readouterr()
    return code, out, " ".join(err.split())


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
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
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


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_char_tokenizer(directory, extra_specials: tuple[str, ...] = ()) -> int:
    """A character-level HF tokenizer (BOS added, chat template), ``extra_specials`` last;
    returns its vocabulary size."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    chars = list(" \n" + string.ascii_letters + string.digits + ".,?!:;'-")
    vocab = {t: i for i, t in enumerate(specials + chars + list(extra_specials))}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *extra_specials],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return len(vocab)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    """(directory, transformers model, teacher) of a tiny Llama with a character tokenizer and a
    chat template (one per test module)."""
    directory = tmp_path_factory.mktemp("chat-llama")
    vocab = write_char_tokenizer(directory)
    hf_model = write_hf_model(directory, "llama", vocab_size=vocab, eos_token_id=2)
    from mmdistill import load_teacher

    return directory, hf_model, load_teacher(str(directory))


def make_omni_student(
    teacher, mode: str = "decoupled", shared_lora: bool = False, seed: int = 1, grid: int = 2
):
    """A tiny seeded student (layer 0 attention) with an image vocabulary of 32 codes on a
    ``grid`` x ``grid`` image and task adapters whose weights are random (so a wrong adapter
    cannot hide)."""
    from mmdistill import seed as seed_student
    from mmdistill.image_vocab import ImageVocabSpec
    from mmdistill.omni_student import add_image_vocabulary
    from mmdistill.roles import parameter_role
    from mmdistill.task_lora import LoraSpec

    base = seed_student(teacher, attention_layers="0", seed=0).float()
    spec = ImageVocabSpec(base.config.vocab_size, 32, grid, embed_dim=16, mode=mode)
    model = add_image_vocabulary(base, spec, LoraSpec(dropout=0.0, shared=shared_lora), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if parameter_role(name) == "lora":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()
