"""Autoregressive generation with the model's own cache: recurrent state for Mamba-2 layers,
a KV cache for the attention layers that remain. Greedy, or sampling with temperature/top-k/
top-p. Long prompts can be prefilled in chunks so activation memory stays bounded."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the model calls down into this module
    from .model import DecoderLM, LMCache


def sample_next(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick the next token from ``logits`` ``[b, vocab]`` -> ``[b]``."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling; got {temperature}")
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
        logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def prefill(
    model: DecoderLM,
    cache: LMCache,
    input_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    chunk_size: int | None = None,
    head: str = "text",
) -> torch.Tensor:
    """Feed a prompt into ``cache``; returns the last position's logits ``[b, vocab]`` from
    ``head`` (``text`` or ``image``: :meth:`~mmdistill.model.DecoderLM.head_logits`)."""
    if inputs_embeds is None:
        inputs_embeds = model.embed(input_ids, pixel_values)
    length = inputs_embeds.shape[1]
    step = chunk_size or length
    logits = None
    for start in range(0, length, step):
        stop = min(start + step, length)
        mask = attention_mask[:, start:stop] if attention_mask is not None else None
        out = model(
            inputs_embeds=inputs_embeds[:, start:stop],
            attention_mask=mask,
            cache=cache,
            logits_slice=slice(-1, None),
            head=head,
        )
        logits = out.logits[:, -1]
    return logits


@torch.no_grad()
def generate(
    model: DecoderLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk_size: int | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate continuations.

    Args:
        input_ids: ``[b, l]`` prompt (left-padded when rows differ in length).
        attention_mask: ``[b, l]`` 1 = real token.
        pixel_values: image tiles for a multimodal front-end.
        eos_token_id: stop a row after it emits one of these (defaults to the config's).
        streamer: called with each new ``[b]`` token tensor as it is produced.

    Returns:
        ``[b, l + n]`` prompt plus generated tokens (``n <= max_new_tokens``; finished rows
        are filled with ``pad_token_id``).
    """
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = torch.tensor(
        []
        if eos_token_id is None
        else ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id),
        device=input_ids.device,
    )
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos.numel() else 0
    b = input_ids.shape[0]
    cache = model.new_cache(b)
    logits = prefill(
        model, cache, input_ids, pixel_values, attention_mask, chunk_size=prefill_chunk_size
    )
    tokens = [input_ids]
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        tokens.append(nxt[:, None])
        if streamer is not None:
            streamer(nxt)
        if eos.numel():
            done = done | torch.isin(nxt, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return torch.cat(tokens, dim=1)
