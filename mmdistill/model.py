"""The decoder language model every teacher and student is expressed as.

``DecoderLM`` = a front-end (token embeddings, or HoVLE's holistic embedding with images) → one
flat list of decoder layers (possibly from several stacks, e.g. HoVLE's 8 embedding-module layers
then its 24 LLM layers; layer indices always count this flat list) → final RMSNorm → LM head.
Each layer's token mixer is attention or a Mamba-2 mixer, per ``config.layer_types``, so the
config alone describes a hybrid student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from .checkpoint import read_student_config, save_pretrained
from .decoder import (
    AttnContext,
    DecoderLayer,
    RMSNorm,
    Rotary,
    VocabLinear,
    mixer_config_for,
    new_layer_state,
)
from .errors import CheckpointError
from .files import read_safetensors
from .frontends import front_end_class
from .image_vocab import ImageVocabSpec, ImageVocabulary
from .lm_config import LMConfig
from .task_lora import LoraSpec, add_adapters, use_adapter


class LMCache:
    """Per-layer recurrent/KV state plus the token bookkeeping needed to continue a sequence.

    Attributes:
        layers: one :class:`~mmdistill.decoder.KVState` or
            :class:`~mmdistill.mixer.MixerState` per layer.
        key_mask: ``[b, t]`` real-token mask of everything seen so far (``None`` = no padding).
        next_pos: ``[b]`` RoPE position of the next token of each row.
        seen: tokens consumed so far (padding included).
        max_length: capacity of the preallocated (static) KV caches, or ``None`` when they grow.
    """

    def __init__(self, model: DecoderLM, batch: int, device, dtype, max_length: int | None = None):
        self.layers = [
            new_layer_state(layer, batch, device, dtype, max_length) for layer in model.layers
        ]
        self.key_mask: torch.Tensor | None = None
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.seen = 0
        self.max_length = max_length

    def select(self, index: torch.Tensor) -> None:
        for state in self.layers:
            state.select(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)

    def reset(self) -> None:
        """Start a new sequence in the same tensors (recurrent states zeroed in place)."""
        for state in self.layers:
            state.reset()
        self.key_mask = None
        self.next_pos.zero_()
        self.seen = 0

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (preallocated KV buffers count in full)."""
        total = 0
        for state in self.layers:
            tensors = (
                (state.k_buffer, state.v_buffer)
                if getattr(state, "k_buffer", None) is not None
                else (getattr(state, name, None) for name in ("k", "v", "conv", "ssm"))
            )
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total


@dataclass
class LMOutput:
    """Forward result. ``captures[i]`` is layer i's (mixer input, mixer output) when asked."""

    logits: torch.Tensor | None
    cache: LMCache | None = None
    hidden_states: list[torch.Tensor] | None = None
    captures: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    last_hidden_state: torch.Tensor | None = None


def build_attention_mask(
    q_len: int,
    key_mask: torch.Tensor | None,
    kv_len: int,
    sliding_window: int | None,
    device,
) -> tuple[torch.Tensor | None, bool]:
    """The ``attn_mask`` for SDPA and whether to pass ``is_causal``.

    Queries are the last ``q_len`` of ``kv_len`` positions. Without padding or a window this is
    ``(None, True)`` for a whole sequence, ``(None, False)`` for one token, and a lower-right
    causal bias for a chunk continuing a cache (which keeps SDPA's fused kernels, unlike a dense
    mask). Otherwise a boolean ``[b|1, 1, q, kv]`` mask (True = attend); padding queries may
    attend to themselves so no softmax row is empty (their outputs are never used).
    """
    if key_mask is None and sliding_window is None:
        if kv_len == q_len:
            return None, True
        if q_len == 1:
            return None, False
        return causal_lower_right(q_len, kv_len), False
    q_idx = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
        allowed = allowed | (q_idx == k_idx)[None, None]
    return allowed, False


class DecoderLM(nn.Module):
    """Front-end → decoder layers (attention or Mamba-2) → norm → LM head."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.front = front_end_class(config.front_end["type"])(config)
        stack_ids = config.stack_of_layer()
        layers = []
        for i, kind in enumerate(config.layer_types):
            stack = config.stacks[stack_ids[i]]
            mixer_cfg = (
                mixer_config_for(config.hidden_size, stack, config.mixer)
                if kind == "mamba"
                else None
            )
            layers.append(DecoderLayer(config.hidden_size, stack, mixer_cfg))
        self.layers = nn.ModuleList(layers)
        self.rotary = nn.ModuleList(Rotary(s) for s in config.stacks)
        self.norm = RMSNorm(config.hidden_size, config.final_norm_eps)
        self.lm_head = VocabLinear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.front.token_embeddings().weight
        self.image_vocab = None
        if config.image_vocab is not None:
            spec = ImageVocabSpec.from_dict(config.image_vocab)
            self.image_vocab = ImageVocabulary(spec, config.hidden_size)
        if config.lora is not None:
            add_adapters(self, LoraSpec.from_dict(config.lora))
        self.task: str | None = None
        self.gradient_checkpointing = False
        self._stack_ids = stack_ids
        firsts = [sum(s.num_layers for s in config.stacks[:k]) for k in range(len(config.stacks))]
        self._normalize_at = {
            first for first, s in zip(firsts, config.stacks, strict=True) if s.l2_normalize_input
        }

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int) -> LMCache:
        return LMCache(self, batch, self.device, self.dtype)

    def save_pretrained(self, directory, **kwargs):
        """See :func:`mmdistill.checkpoint.save_pretrained`."""
        return save_pretrained(self, directory, **kwargs)

    def mixer_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.config.layer_types) if t == "mamba"]

    def use_task(self, task: str) -> None:
        """Run as ``task`` (``mmu`` or ``t2i``): activates its LoRA adapter, if the model has any."""
        if self.config.lora is not None:
            use_adapter(self, LoraSpec.from_dict(self.config.lora).adapter_for(task))
        self.task = task

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings; ids past the text vocabulary (t2i layout tokens and image codes) go
        through the image vocabulary. ``image_positions`` gives each code's raster index (default:
        codes counted from the start of each row)."""
        if self.image_vocab is None:
            return self.front(input_ids, pixel_values)
        text_vocab = self.image_vocab.spec.text_vocab_size
        is_text = input_ids < text_vocab
        x = self.front(input_ids.where(is_text, 0), pixel_values)
        if bool(is_text.all()):
            return x
        if image_positions is None:
            is_code = input_ids >= self.image_vocab.spec.code_offset
            image_positions = is_code.long().cumsum(-1) - 1
        image = self.image_vocab.embed_tokens(input_ids, image_positions).to(x.dtype)
        return torch.where(is_text[..., None], x, image)

    def head_logits(self, hidden: torch.Tensor, head: str = "text") -> torch.Tensor:
        """Logits of ``hidden`` from the ``text`` head (the LM head) or the ``image`` head.

        With a shared vocabulary both heads are the one joint head (text rows, then code rows).
        """
        if head not in ("text", "image"):
            raise ValueError(f"head must be 'text' or 'image'; got {head!r}")
        vocab = self.image_vocab
        if vocab is None:
            if head == "image":
                raise ValueError("this model has no image vocabulary")
            return self.text_logits(hidden)
        if vocab.spec.mode == "shared":
            return torch.cat([self.text_logits(hidden), vocab.head(hidden)], dim=-1)
        return vocab.head(hidden) if head == "image" else self.text_logits(hidden)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits, soft-capped (``cap * tanh(logits / cap)``) when the config has
        ``final_logit_softcap`` (Gemma 2)."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        capture_mixers: bool = False,
        layer_range: tuple[int, int] | None = None,
        compute_logits: bool = True,
        logits_slice: slice | None = None,
        head: str = "text",
    ) -> LMOutput:
        """Run the model.

        Args:
            input_ids: ``[b, l]`` token ids (or give ``inputs_embeds`` ``[b, l, hidden]``).
            pixel_values: ``[n, 3, H, W]`` image tiles for a multimodal front-end.
            attention_mask: ``[b, l]`` 1 = real token, 0 = padding (left padding for generation).
            cache: continue from and update this cache (prefill chunks, decode steps).
            output_hidden_states: return the residual stream entering each layer, then the final
                (pre-norm) state.
            capture_mixers: return each layer's (mixer input, mixer output).
            layer_range: run only layers ``[start, stop)`` (stages 1-2 stop early).
            compute_logits: skip the LM head when False.
            logits_slice: apply the LM head to ``hidden[:, logits_slice]`` only (e.g. the last
                token during generation).
            head: ``text`` (the LM head) or ``image`` (see :meth:`head_logits`).

        Returns:
            :class:`LMOutput`.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids, pixel_values)
        x = inputs_embeds
        b, l, _ = x.shape
        if (
            attention_mask is not None
            and bool(attention_mask.all())
            and (cache is None or cache.key_mask is None)
        ):
            attention_mask = None  # all real tokens: keep the fast causal path
        past = cache.seen if cache is not None else 0
        base = (
            cache.next_pos[:, None]
            if cache is not None
            else torch.zeros(b, 1, dtype=torch.long, device=x.device)
        )
        if attention_mask is not None:
            positions = base + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = base + torch.arange(l, device=x.device)[None]
        key_mask = None
        if attention_mask is not None or (cache is not None and cache.key_mask is not None):
            new = (
                attention_mask if attention_mask is not None else x.new_ones(b, l, dtype=torch.long)
            )
            old = (
                cache.key_mask
                if cache is not None and cache.key_mask is not None
                else x.new_ones(b, past, dtype=torch.long)
            )
            key_mask = torch.cat([old.to(new.dtype), new], dim=1)
        ctxs = []
        for stack, rotary in zip(self.config.stacks, self.rotary, strict=True):
            cos, sin = rotary(positions, x.dtype)
            mask, causal = build_attention_mask(
                l, key_mask, past + l, stack.sliding_window, x.device
            )
            ctxs.append(AttnContext(cos, sin, mask, causal, attention_mask))

        start, stop = layer_range or (0, len(self.layers))
        hidden_states = [] if output_hidden_states else None
        captures = [] if capture_mixers else None
        for i in range(start, stop):
            layer = self.layers[i]
            if i in self._normalize_at:
                x = x / x.norm(dim=-1, keepdim=True)
            if hidden_states is not None:
                hidden_states.append(x)
            ctx = ctxs[self._stack_ids[i]]
            state = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and cache is None and captures is None:
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            elif captures is not None:
                x, pair = layer(x, ctx, state, capture=True)
                captures.append(pair)
            else:
                x = layer(x, ctx, state)
        if cache is not None:
            cache.key_mask = key_mask
            cache.seen = past + l
            step = attention_mask.long().sum(-1) if attention_mask is not None else l
            cache.next_pos = cache.next_pos + step
        if hidden_states is not None:
            hidden_states.append(x)
        logits = None
        last = None
        if stop == len(self.layers):
            last = self.norm(x)
            if compute_logits:
                kept = last if logits_slice is None else last[:, logits_slice]
                logits = self.head_logits(kept, head)
        return LMOutput(
            logits=logits,
            cache=cache,
            hidden_states=hidden_states,
            captures=captures,
            last_hidden_state=last,
        )


def expected_shapes(model: DecoderLM) -> dict[str, torch.Size]:
    """Every state-dict key of ``model`` with its shape (a tied LM head is not a key)."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def build_from_state_dict(
    config: LMConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> DecoderLM:
    """Instantiate on the meta device and assign ``tensors`` (no random-init cost or copy)."""
    with torch.device("meta"):
        model = DecoderLM(config)
    if config.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        tensors["lm_head.weight"] = tensors["front.embed_tokens.weight"]
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.front.token_embeddings().weight
    for rotary in model.rotary:
        rotary.reset_frequencies()
    if hasattr(model.front, "reset_buffers"):  # buffers no checkpoint holds (LLaVA's tower)
        model.front.reset_buffers()
    return model.eval()


def load_student(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> DecoderLM:
    """Rebuild a model written by :func:`mmdistill.checkpoint.save_pretrained`, without its
    teacher.

    Raises:
        CheckpointError: the directory is not a complete mmdistill checkpoint.
    """
    directory = Path(directory)
    config = read_student_config(directory)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tensors = read_safetensors(directory)
    try:
        model = build_from_state_dict(config, tensors, dtype)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not match config.json: {exc}") from exc
    return model.to(device)
