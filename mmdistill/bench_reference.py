"""The teacher as its users run it: transformers' own model class, as ``mmdistill bench`` rows.

:func:`reference_model` gives, for a teacher loaded from a folder whose architecture
transformers has a class for, that class loaded from the folder. For a random shape
(``--random-shape``), it gives a ``LlamaForCausalLM`` with the same layers, widths, heads and
vocabulary and random weights. HoVLE-2.6B's decoder is Llama-shaped apart from an L2
normalisation between its two stacks. Anything else gets no row (``None``).
:func:`measure_reference` prefills and decodes it as users do, with transformers' default
growing ``DynamicCache`` or a ``StaticCache`` sized to the request, and returns its timings for
:func:`mmdistill.bench.measure`'s row.
"""

from __future__ import annotations

import inspect

import torch

from .model import DecoderLM
from .teachers.verify import reference_class
from .timing import Timer


def reference_model(teacher: DecoderLM, device, dtype: torch.dtype):
    """transformers' model of ``teacher`` (module docstring), in eval mode on ``device``, or
    ``None`` when there is none."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = teacher.config.teacher.get("directory")
    hf_config = teacher.config.teacher.get("config") or {}
    cls = reference_class(hf_config) if directory else None
    if cls is not None and not hasattr(cls, "get_image_features"):
        return cls.from_pretrained(directory, dtype=dtype).to(device).eval()
    if directory:
        return None  # a model transformers has no (text) class for
    stack = teacher.config.stacks[-1]
    config = LlamaConfig(
        vocab_size=teacher.config.vocab_size,
        hidden_size=teacher.config.hidden_size,
        intermediate_size=stack.intermediate_size,
        num_hidden_layers=teacher.config.num_layers,
        num_attention_heads=stack.num_heads,
        num_key_value_heads=stack.num_kv_heads,
        head_dim=stack.head_dim,
        rope_theta=stack.rope_theta,
        max_position_embeddings=1 << 21,
    )
    return build_on(lambda: LlamaForCausalLM(config), device, dtype, seed=0).eval()


def build_on(factory, device, dtype: torch.dtype, seed: int):
    """``factory()`` with its tensors created on ``device`` in ``dtype`` (no copies, no
    float32 detour), under a forked RNG seeded with ``seed``."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return factory()
        finally:
            torch.set_default_dtype(previous)


def _cache_keyword(model) -> str:
    """``cache`` (transformers 5.24+) or ``past_key_values`` (earlier)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def measure_reference(
    model, length: int, batch: int, decode_tokens: int, seed: int, static: bool
) -> tuple[float, float, int | None]:
    """Prefill ``length`` random tokens at ``batch`` rows, then ``decode_tokens`` greedy steps:
    ``(prefill ms, decode ms, peak CUDA memory or None)``."""
    from transformers import DynamicCache, StaticCache

    device = model.device
    generator = torch.Generator().manual_seed(seed + length)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    ids = ids.to(device)
    if static:
        cache = StaticCache(config=model.config, max_cache_len=length + decode_tokens + 1)
    else:
        cache = DynamicCache(config=model.config)
    key = _cache_keyword(model)
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer.start()
    logits = model(ids, **{key: cache}, use_cache=True, logits_to_keep=1).logits
    prefill_ms = timer.stop_ms()
    tokens = logits[:, -1].argmax(-1)
    timer.start()
    for _ in range(decode_tokens):
        out = model(tokens[:, None], **{key: cache}, use_cache=True, logits_to_keep=1)
        tokens = out.logits[:, -1].argmax(-1)
    decode_ms = timer.stop_ms()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return prefill_ms, decode_ms, peak
