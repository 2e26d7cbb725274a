"""Greedy decode steps replayed from a captured CUDA graph (optionally ``torch.compile``'d first).

A batch-1 decode step of a 2-3B model is a few hundred small kernels. Launched one by one from
Python, the GPU waits on the CPU between them and the step takes several times the time needed
to read the weights once. :class:`GraphDecoder` captures one whole step (embedding, every layer,
final norm, LM head, argmax) in a CUDA graph over a fixed cache, and replays it. With
``compile=True`` the step is first compiled by ``torch.compile`` (Inductor fuses the norms and
element-wise work into a few kernels), then captured.

Mamba-2 mixers update their fixed-shape state in place. Attention layers need a static KV cache
(``max_length``) whose fill level the step keeps on the device: the captured step writes the new
token at that position and attends over the whole buffer with the positions past it masked
(:func:`mmdistill.kernels.attention.decode_attention`). Hybrids therefore replay too, for
prompts without padding and stacks without a sliding window.

A captured step bakes in the task adapter active at capture (a student with task LoRA,
:mod:`mmdistill.task_lora`): the decoder remembers that task and refuses to replay once the model
runs another one, rather than replaying the wrong adapter's graph. Text-to-image steps (image
codes in, the image head out) are :class:`mmdistill.t2i_graph.ImageGraphDecoder`.

With ``capture=False`` nothing is captured and :meth:`GraphDecoder.replay` runs the same step
eagerly (on any device): the CPU tests check the step's arithmetic that way.

Usage::

    decoder = GraphDecoder(model, batch=1)            # warm-up and capture (state is then reset)
    # a hybrid: GraphDecoder(model, batch=1, max_length=prompt_length + new_tokens)
    logits = decoder.prefill(input_ids, chunk_size=8192)
    decoder.tokens.copy_(logits.argmax(-1))
    for _ in range(n):
        decoder.replay()                              # decoder.logits, decoder.tokens: next step
"""

from __future__ import annotations

import torch

from .cached_forward import prefill
from .model import DecoderLM, LMCache


def attention_layers(model: DecoderLM) -> list[int]:
    """Indices of the model's attention layers (they need a static KV cache to replay)."""
    return [i for i, t in enumerate(model.config.layer_types) if t != "mamba"]


def unsupported(model: DecoderLM, padded: bool = False) -> str | None:
    """Why :class:`GraphDecoder` cannot decode ``model`` (``padded``: a left-padded prompt), or
    ``None`` when it can."""
    if not attention_layers(model):
        return None
    stacks = model.config.stacks
    if any(s.sliding_window is not None for s in stacks):
        return "sliding-window attention"
    if any(s.attn_scale or s.attn_softcap for s in stacks):
        return "attention with a custom score scale or soft-capping"
    if padded:
        return "left-padded prompts through attention layers (its attention step has no key mask)"
    return None


class GraphDecoder:
    """One greedy decode step, captured once and replayed.

    Attributes:
        cache: the static :class:`~mmdistill.model.LMCache` the graph reads and updates.
        tokens: ``[b]`` long, the tokens the next replay consumes; each replay overwrites it with
            the step's argmax (greedy decoding feeds itself).
        logits: ``[b, vocab]`` output of the last replay (a static buffer, overwritten).
        head: the head whose logits the steps and :meth:`prefill` return (``text``).
    """

    head = "text"

    def __init__(
        self,
        model: DecoderLM,
        batch: int,
        *,
        compile: bool = False,
        warmup: int = 3,
        max_length: int | None = None,
        capture: bool = True,
    ) -> None:
        """Warm up, capture the step, then reset the cache to an empty sequence.

        Args:
            model: a model on a CUDA device (any device without ``capture``).
            batch: rows decoded per step.
            compile: ``torch.compile`` the step before capturing it.
            warmup: eager (or compiling) runs before the capture.
            max_length: capacity in tokens of the attention layers' static KV caches (prompt
                plus generated tokens); required when the model has attention layers, ignored
                otherwise.
            capture: ``False``: capture nothing, :meth:`replay` runs the step eagerly.

        Raises:
            ValueError: for a model not on CUDA (when capturing); with attention layers, for a
                missing or too small ``max_length`` or a sliding-window stack.
        """
        attention = attention_layers(model)
        if attention:
            if max_length is None:
                raise ValueError(
                    f"layers {attention} are attention: give max_length (prompt plus new tokens) "
                    "so their KV caches can be preallocated for the captured step"
                )
            if max_length < warmup + 1:
                raise ValueError(f"max_length must be at least {warmup + 1}; got {max_length}")
        reason = unsupported(model)
        if reason:
            raise ValueError(f"GraphDecoder does not support {reason}")
        if capture and model.device.type != "cuda":
            raise ValueError("GraphDecoder needs a model on a CUDA device")
        self.model = model
        self.task = model.task
        if model.device.type == "cuda":
            for layer in model.layers:
                layer.pack_projections()
        self.cache = LMCache(
            model, batch, model.device, model.dtype, max_length if attention else None
        )
        self._kv_states = [self.cache.layers[i] for i in attention]
        for state in self._kv_states:
            state.track_on_device()
        self._positions = self.cache.next_pos
        self.tokens = torch.zeros(batch, dtype=torch.long, device=model.device)
        self._forward = torch.compile(self._model_step, dynamic=False) if compile else None
        self.graph = self.logits = None
        if capture:
            self._capture(warmup)
        self.cache.reset()
        self.tokens.zero_()

    def _capture(self, warmup: int) -> None:
        """Run ``warmup`` steps on a side stream, capture one into :attr:`graph`, replay it once
        (the caller resets the state these steps advanced)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = self._step()
        self.graph.replay()  # the first replay uploads the graph: part of set-up, not decode

    def _model_step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], cache=self.cache, logits_slice=slice(-1, None))
        return out.logits[:, -1]

    def _step(self) -> torch.Tensor:
        cache = self.cache
        # The past length only feeds attention masks (there are none); holding it at 0 keeps
        # the compiled step from being specialised on it. replay() keeps the count.
        seen, cache.seen = cache.seen, 0
        logits = (self._forward or self._model_step)(self.tokens)
        self._positions.copy_(cache.next_pos)
        cache.next_pos = self._positions
        cache.seen = seen
        self.tokens.copy_(logits.argmax(-1))
        for state in self._kv_states:
            state.advance()
        return logits

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reset the cache and feed a prompt into it (eagerly, in place).

        Args:
            input_ids: ``[b, l]`` prompt, ``b`` = the decoder's batch.
            attention_mask: ``[b, l]`` for left-padded prompts.
            chunk_size: prefill chunk length (``None``: one pass).
            pixel_values: image tiles for a multimodal front-end.

        Returns:
            ``[b, vocab]`` logits of the last prompt position.
        """
        if self._kv_states and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "GraphDecoder decodes padded prompts only for all-Mamba models (its attention "
                "step has no key mask); give prompts of equal length"
            )
        self.cache.reset()
        logits = prefill(
            self.model,
            self.cache,
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            chunk_size=chunk_size,
            head=self.head,
        )
        for state in self._kv_states:
            state.sync_length()  # a one-token last chunk wrote at the slot only
        self._positions.copy_(self.cache.next_pos)
        self.cache.next_pos = self._positions
        return logits

    def load_cache(self, other: LMCache) -> None:
        """Copy a prefilled cache (same batch, or batch 1 broadcast to every row) into place.

        Raises:
            ValueError: for a padded cache when the model has attention layers.
        """
        if self._kv_states and other.key_mask is not None and not bool(other.key_mask.all()):
            raise ValueError("GraphDecoder cannot continue a padded cache through attention")
        for dst, src in zip(self.cache.layers, other.layers, strict=True):
            dst.copy_(src)
        self._positions.copy_(other.next_pos.expand_as(self._positions))
        self.cache.next_pos = self._positions
        self.cache.key_mask = None
        self.cache.seen = other.seen

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[b]`` (e.g. sampled ones) through one :meth:`replay`; its logits."""
        self.tokens.copy_(tokens)
        return self.replay()

    def replay(self) -> torch.Tensor:
        """Run one captured (or, without a graph, eager) step: consumes :attr:`tokens`, refreshes
        :attr:`logits` and :attr:`tokens` (the argmax). Returns :attr:`logits`.

        Raises:
            ValueError: the model now runs another task than the one captured.
        """
        if self.model.task != self.task:
            raise ValueError(
                f"this decode graph was captured for task {self.task!r}, but the model now runs "
                f"{self.model.task!r}; capture one GraphDecoder per task"
            )
        for state in self._kv_states:
            state.check_room(1)  # inside the graph an overflow would be a device-side fault
        if self.graph is None:
            with torch.no_grad():
                self.logits = self._step()  # counts the KV caches' new token itself
        else:
            self.graph.replay()
            for state in self._kv_states:
                state.advance()
        self.cache.seen += 1
        return self.logits
