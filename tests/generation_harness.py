"""The one check of cached inference that every model's tests use (teachers, linear and hybrid
students, HoVLE with images): a prefix prefilled into a cache and the rest fed one token at a
time gives the logits of a full forward without a cache, and greedy cached generation gives the
tokens of greedy recomputation (a full forward per new token).

Left-padded batches: row ``i``'s first ``left_pad[i]`` ids are padding (attention mask 0, the
ids left as junk); its reference is the row alone without them, so padding must be invisible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmdistill.cached_forward import prefill
from mmdistill.generation import generate
from mmdistill.graph_decode import unsupported
from mmdistill.model import DecoderLM, LMCache


def left_pad_mask(ids: torch.Tensor, left_pad: Sequence[int] | None) -> torch.Tensor | None:
    """``[b, l]`` attention mask with row ``i``'s first ``left_pad[i]`` positions 0."""
    if left_pad is None:
        return None
    assert len(left_pad) == ids.shape[0], "one padding length per row"
    mask = torch.ones_like(ids)
    for i, pad in enumerate(left_pad):
        mask[i, :pad] = 0
    return mask


@torch.no_grad()
def cached_logits(
    model: DecoderLM,
    ids: torch.Tensor,
    prefix: int,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    chunk_size: int | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, LMCache]:
    """Prefill ``ids[:, :prefix]`` into a fresh cache (in chunks of ``chunk_size``; a static KV
    cache of ``max_length`` if given), then feed the other ids one token at a time.

    Returns:
        The logits at positions ``prefix - 1 .. l - 1`` ``[b, l - prefix + 1, vocab]`` and the
        cache.
    """
    cache = LMCache(model, ids.shape[0], ids.device, model.dtype, max_length=max_length)
    mask = attention_mask[:, :prefix] if attention_mask is not None else None
    steps = [prefill(model, cache, ids[:, :prefix], pixel_values, mask, chunk_size=chunk_size)]
    for t in range(prefix, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], cache=cache).logits[:, -1])
    return torch.stack(steps, 1), cache


@torch.no_grad()
def greedy_recompute(
    model: DecoderLM, ids: torch.Tensor, n: int, pixel_values: torch.Tensor | None = None
) -> torch.Tensor:
    """``n`` greedy tokens ``[b, n]``, each from a full forward over everything so far."""
    seq = ids
    for _ in range(n):
        nxt = model(seq, pixel_values=pixel_values).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq[:, ids.shape[1] :]


@torch.no_grad()
def check_cached_generation(
    model: DecoderLM,
    ids: torch.Tensor,
    prefix: int,
    *,
    left_pad: Sequence[int] | None = None,
    pixel_values: torch.Tensor | None = None,
    chunk_size: int | None = None,
    max_length: int | None = None,
    new_tokens: int = 6,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> tuple[torch.Tensor, LMCache]:
    """Assert that cached inference of ``model`` on ``ids`` ``[b, l]`` is its full forward.

    1. :func:`cached_logits` (prefill of ``prefix`` ids, then one-token steps) equals the full
       forward's logits at every position from ``prefix - 1`` on;
    2. greedy :func:`~mmdistill.generation.generate` (prefill in chunks of ``chunk_size``,
       cached steps) of ``new_tokens`` equals :func:`greedy_recompute`, on the eager path and,
       where the graph decoder supports the model and prompt, on the graph path (its step run
       without capture off CUDA).

    ``pixel_values`` go with the prompt (its image tokens must lie in the prefix); they cannot
    be combined with ``left_pad``. Returns :func:`cached_logits`' result for further checks.
    """
    b, length = ids.shape
    pads = list(left_pad) if left_pad is not None else [0] * b
    assert max(pads) < prefix <= length, "every row needs a real token in the prefix"
    assert pixel_values is None or not any(pads), "images with left padding: not supported"
    mask = left_pad_mask(ids, left_pad)
    cached, cache = cached_logits(
        model,
        ids,
        prefix,
        attention_mask=mask,
        pixel_values=pixel_values,
        chunk_size=chunk_size,
        max_length=max_length,
    )
    padded = mask is not None and not bool(mask.all())
    paths = ["eager"] + (["graph"] if unsupported(model, padded) is None else [])
    outs = {
        path: generate(
            model,
            ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            max_new_tokens=new_tokens,
            eos_token_id=[],
            prefill_chunk_size=chunk_size,
            decode=path,
        )
        for path in paths
    }
    for path, out in outs.items():
        assert out.shape == (b, length + new_tokens), path
        assert torch.equal(out[:, :length], ids), path
    if any(pads):
        for i, pad in enumerate(pads):
            alone = ids[i : i + 1, pad:]
            full = model(alone).logits[0, prefix - 1 - pad :]
            torch.testing.assert_close(cached[i], full, rtol=rtol, atol=atol)
            expected = greedy_recompute(model, alone, new_tokens)
            for path, out in outs.items():
                assert torch.equal(out[i : i + 1, length:], expected), f"row {i}, {path}"
    else:
        full = model(ids, pixel_values=pixel_values).logits[:, prefix - 1 :]
        torch.testing.assert_close(cached, full, rtol=rtol, atol=atol)
        expected = greedy_recompute(model, ids, new_tokens, pixel_values)
        for path, out in outs.items():
            assert torch.equal(out[:, length:], expected), path
    return cached, cache
