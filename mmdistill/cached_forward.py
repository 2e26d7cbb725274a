"""What every decode path shares: feeding a prompt into a cache (:func:`prefill`), picking the
next token from logits (:func:`sample_next`), and the eager reference decoder
(:class:`EagerDecoder`: one forward per token through the model's own growing cache).
:mod:`mmdistill.graph_decode` replays the same step from a captured CUDA graph;
:func:`mmdistill.generation.generate` picks between them."""

from __future__ import annotations

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
    ``head`` (``text`` or ``image``: :meth:`~mmdistill.model.DecoderLM.head_logits`).

    With ``chunk_size``, the prompt goes through in chunks of that many tokens, so activation
    memory is bounded by the chunk, not the prompt. A text-only prompt is embedded a chunk at a
    time too (at 1M tokens the whole prompt's embeddings would take 4 GiB at width 2048 in bf16);
    images, and image codes (whose positions count from the prompt's start), are embedded
    whole first.
    """
    per_chunk = inputs_embeds is None and pixel_values is None and model.image_vocab is None
    if inputs_embeds is None and not per_chunk:
        inputs_embeds = model.embed(input_ids, pixel_values)
    length = (input_ids if per_chunk else inputs_embeds).shape[1]
    step = chunk_size or length
    logits = None
    for start in range(0, length, step):
        stop = min(start + step, length)
        mask = attention_mask[:, start:stop] if attention_mask is not None else None
        if per_chunk:
            embeds = model.embed(input_ids[:, start:stop])
        else:
            embeds = inputs_embeds[:, start:stop]
        out = model(
            inputs_embeds=embeds,
            attention_mask=mask,
            cache=cache,
            logits_slice=slice(-1, None),
            head=head,
        )
        logits = out.logits[:, -1]
    return logits


class EagerDecoder:
    """The reference decode path: the model's own cache (growing KV caches), one eager forward
    per step. Same interface as :class:`~mmdistill.graph_decode.GraphDecoder`'s
    :meth:`prefill` and :meth:`step`."""

    def __init__(self, model: DecoderLM, batch: int) -> None:
        self.model = model
        self.cache = model.new_cache(batch)

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed the prompt; the last position's logits ``[b, vocab]``."""
        return prefill(
            self.model, self.cache, input_ids, pixel_values, attention_mask, chunk_size=chunk_size
        )

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[b]``; the next logits ``[b, vocab]``."""
        return self.model(tokens[:, None], cache=self.cache).logits[:, -1]
