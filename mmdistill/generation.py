"""Autoregressive generation with the model's own cache: recurrent state for Mamba-2 layers,
a KV cache for the attention layers that remain. Greedy, or sampling with temperature/top-k/
top-p; stop tokens; streaming; left-padded batches; images. Prompts are prefilled in chunks of
``prefill_chunk_size`` tokens (8192 by default; ``None``: one pass), so activation memory stays
bounded by the chunk, for attention layers too (each chunk after the first attends to the KV
cache through SDPA's lower-right causal bias, keeping its fused kernels).

Two decode paths give the same tokens (``decode``):

* ``graph``, the default on CUDA: every step after the prefill replays one captured CUDA graph
  (:class:`~mmdistill.graph_decode.GraphDecoder`), with a static KV cache for attention layers
  sized from the request (prompt plus new tokens, rounded up to a power of two so later
  requests reuse it). Sampling, stop tokens and streaming run between replays on the step's
  logits. The decoder is captured once per model, task and batch size and kept on the model
  for later calls in the process; a request longer than its KV cache replaces it with a larger
  one. ``compile=True`` compiles the step with ``torch.compile`` before capturing it, for a
  one-time cost; with the decoder's inference kernels the uncompiled step is now as fast or
  faster (docs/evaluation.md). Off CUDA, ``graph`` runs the same step without capturing it
  (what the CPU tests check).
* ``eager``, the reference and what CPU uses: one forward per token through the model's
  growing cache (:class:`~mmdistill.cached_forward.EagerDecoder`).

``auto`` (the default) is ``graph`` on CUDA where the graph decoder supports the model and
prompt, else ``eager``: attention layers with a sliding window, a custom score scale or
soft-capping, and left-padded prompts through attention layers decode eagerly.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from .cached_forward import EagerDecoder, sample_next
from .graph_decode import GraphDecoder, attention_layers, unsupported

if TYPE_CHECKING:
    from .model import DecoderLM

DECODE_PATHS = ("auto", "graph", "eager")
KEPT_DECODERS = 4  # graph decoders kept per model (oldest dropped first)
# Steps between checks (a host sync) of whether every row has stopped. A sync per step would
# leave the GPU idle while Python prepares the next one; steps after the last row stopped are
# cut from the output, so the result is the same.
STOP_CHECK = 8


class _KeptDecoders(dict):
    """The graph decoders kept on a model, keyed by task, batch and compilation, with the
    weights they were captured on (``weights``: their storage addresses). A copy of the model
    starts with none (its weights are other tensors)."""

    weights: tuple[int, ...] = ()

    def __deepcopy__(self, memo) -> _KeptDecoders:
        return _KeptDecoders()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (as it was before, after).

    The decode loop makes no reference cycles, so nothing waits for the collector there. A full
    collection in a process holding a model, torch and transformers walks some 430,000 objects:
    200-260 ms on the H200 machine's host (docs/benchmarks.md), a hundred decode steps during
    which the GPU would sit idle. A collection that comes due runs after the loop instead."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _capacity(needed: int) -> int:
    """A static KV cache size for ``needed`` tokens: the next power of two, at least 256."""
    return max(256, 1 << (needed - 1).bit_length())


def kept_graph_decoder(
    model: DecoderLM,
    batch: int,
    needed: int,
    compile: bool = False,
    kind: type[GraphDecoder] = GraphDecoder,
) -> GraphDecoder:
    """A graph decoder of class ``kind`` (:class:`GraphDecoder`, or a subclass such as the
    image step's) for ``model``, from the ones kept on it, captured now if none fits.

    One decoder is kept per task, batch, compilation and head (at most ``KEPT_DECODERS``, the
    oldest dropped first). With attention layers it is replaced by a larger one when a request
    needs more than its KV cache holds (``needed`` tokens), so caches only grow. All are
    dropped when the model's weights move: a replayed graph reads the storage it was captured
    on."""
    kept = model.__dict__.setdefault("_graph_decoders", _KeptDecoders())
    if kept.weights != _weights(model):
        kept.clear()
    key = (model.task, batch, compile, kind.head)
    decoder = kept.pop(key, None)
    room = None if decoder is None else decoder.cache.max_length
    if decoder is None or (room is not None and room < needed):
        del decoder  # its cache and graph are freed before the new capture
        if len(kept) >= KEPT_DECODERS:
            kept.pop(next(iter(kept)))
        capacity = _capacity(needed) if attention_layers(model) else None
        capture = model.device.type == "cuda"
        decoder = kind(model, batch, compile=compile, max_length=capacity, capture=capture)
    kept[key] = decoder  # now the newest
    kept.weights = _weights(model)  # after the capture packed the mixers' projections
    return decoder


def _weights(model: DecoderLM) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in model.parameters())


def choose_path(decode: str, reason: str | None, on_cuda: bool) -> str:
    """``graph`` or ``eager``: where path ``decode`` (``auto``/``graph``/``eager``) goes, given
    why the captured step cannot serve the request (``reason``; ``None`` when it can).

    Raises:
        ValueError: an unknown path, or ``graph`` with a ``reason``.
    """
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}; got {decode!r}")
    if decode == "graph" and reason:
        raise ValueError(f"the captured decode step does not support {reason}; use decode='eager'")
    if decode == "eager" or (decode == "auto" and (reason or not on_cuda)):
        return "eager"
    return "graph"


def resolve_path(model: DecoderLM, decode: str, attention_mask: torch.Tensor | None = None) -> str:
    """:func:`choose_path` for text generation with ``model`` and a prompt with
    ``attention_mask`` (module docstring)."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    return choose_path(decode, unsupported(model, padded), model.device.type == "cuda")


def choose_decoder(
    model: DecoderLM,
    decode: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    compile: bool = False,
) -> EagerDecoder | GraphDecoder:
    """The decoder of path ``decode`` for this request (:func:`resolve_path`)."""
    if resolve_path(model, decode, attention_mask) == "eager":
        return EagerDecoder(model, input_ids.shape[0])
    needed = input_ids.shape[1] + max_new_tokens
    return kept_graph_decoder(model, input_ids.shape[0], needed, compile)


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
    prefill_chunk_size: int | None = 8192,
    streamer: Callable[[torch.Tensor], None] | None = None,
    decode: str = "auto",
    compile: bool = False,
) -> torch.Tensor:
    """Generate continuations.

    Args:
        input_ids: ``[b, l]`` prompt (left-padded when rows differ in length).
        attention_mask: ``[b, l]`` 1 = real token.
        pixel_values: image tiles for a multimodal front-end.
        eos_token_id: stop a row after it emits one of these (defaults to the config's).
        streamer: called with each new ``[b]`` token tensor as it is produced (also, for up to
            ``STOP_CHECK - 1`` steps after every row has stopped, with rows of padding that are
            not part of the result).
        decode: ``auto``, ``graph`` or ``eager`` (module docstring).
        compile: ``torch.compile`` the graph path's step before capturing it.

    Returns:
        ``[b, l + n]`` prompt plus generated tokens (``n <= max_new_tokens``; finished rows
        are filled with ``pad_token_id``), a view of a ``[b, l + max_new_tokens]`` buffer.
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
    b, prompt_len = input_ids.shape
    decoder = choose_decoder(model, decode, input_ids, attention_mask, max_new_tokens, compile)
    logits = decoder.prefill(input_ids, attention_mask, prefill_chunk_size, pixel_values)
    out, stopped = _result_buffers(input_ids, max_new_tokens, pad_token_id)
    pad = out[:, -1].clone()  # the padding of finished rows
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    with collector_paused():
        for step in range(max_new_tokens):
            nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, pad, nxt)
            out[:, prompt_len + step] = nxt
            if eos.numel():  # before the streamer: the first use of these kernels is set-up
                torch.logical_or(done, torch.isin(nxt, eos), out=done)
                stopped[step] = done.all()
            if streamer is not None:
                streamer(nxt)
            if step == max_new_tokens - 1 or (
                step % STOP_CHECK == 0 and eos.numel() and stopped[step].item()
            ):
                break
            logits = decoder.step(nxt)
    return out[:, : prompt_len + _generated(stopped, step + 1)]


def _result_buffers(
    input_ids: torch.Tensor, max_new_tokens: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The result ``[b, l + max_new_tokens]`` (the prompt, then padding for the new tokens) and
    one flag per step, set when every row has stopped by then. The loop writes into both, and
    the end of a request reads a slice of each: no kernel runs for the first time after the
    first token (in a process's first request, a kernel's first use costs milliseconds)."""
    b, prompt_len = input_ids.shape
    out = input_ids.new_full((b, prompt_len + max_new_tokens), pad_token_id)
    out[:, :prompt_len] = input_ids
    return out, torch.zeros(max_new_tokens, dtype=torch.bool, device=input_ids.device)


def _generated(stopped: torch.Tensor, steps: int) -> int:
    """How many new tokens to keep after ``steps`` steps: up to the step where the last row
    stopped, as a check at every step would."""
    flags = stopped[:steps].tolist()
    return flags.index(True) + 1 if True in flags else steps
