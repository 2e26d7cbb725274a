"""Text-to-image decoding with the step replayed from a CUDA graph: the greedy loop of
:func:`mmdistill.t2i_generation.generate_codes`, one captured step per code.

A step feeds each row's last code through the image vocabulary (the code's embedding plus the
embedding of its raster position, read from a device counter that the step advances), runs every
layer with the cache, takes the image head's logits and their argmax, and writes the new code
into :attr:`ImageGraphDecoder.codes`: no host work between steps, so a whole image is
``grid * grid - 1`` replays. The decoder runs the model as the ``t2i`` task (its LoRA adapter, if
any, is active at capture) and, like every :class:`~mmdistill.graph_decode.GraphDecoder`,
refuses to replay once the model runs another task. Greedy only, without guidance (OmniMamba's
released sampler is greedy); prompts of equal length (no padding) when the model has attention.

Usage::

    decoder = ImageGraphDecoder(model, batch=8, max_length=prompt_length + 256)
    logits = decoder.prefill(prompt_ids)         # or: decoder.load_cache(a one-row cache)
    out = decoder.generate(logits)                # GeneratedCodes, codes [8, grid, grid]
"""

from __future__ import annotations

import torch

from .graph_decode import GraphDecoder
from .model import DecoderLM
from .t2i_generation import GeneratedCodes, check_t2i_student


class ImageGraphDecoder(GraphDecoder):
    """One greedy t2i step, captured once (``capture=False``: run eagerly) and replayed.

    Attributes:
        tokens: ``[b]`` the image head's index of each row's last code (the code itself with a
            decoupled vocabulary; with a shared one, an index into text then code rows).
        position: ``[b, 1]`` raster index of the code the next step feeds.
        codes: ``[b, grid * grid]`` the image head's indices chosen so far, in raster order.
    """

    head = "image"

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
        """Like :class:`~mmdistill.graph_decode.GraphDecoder` (same arguments); the model must
        have an image vocabulary and is switched to the ``t2i`` task.

        Raises:
            CheckpointError: the model has no image vocabulary.
        """
        check_t2i_student(model)
        model.use_task("t2i")
        self.spec = model.image_vocab.spec
        self._first_code = self.spec.text_vocab_size if self.spec.mode == "shared" else 0
        device = model.device
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.codes = torch.zeros(batch, self.spec.codes_per_image, dtype=torch.long, device=device)
        self.emitted = 0
        super().__init__(
            model, batch, compile=compile, warmup=warmup, max_length=max_length, capture=capture
        )
        self.position.zero_()
        self.codes.zero_()

    def _model_step(self, chosen: torch.Tensor) -> torch.Tensor:
        is_code = chosen >= self._first_code
        ids = torch.where(is_code, chosen - self._first_code + self.spec.code_offset, chosen)
        embeds = self._embed(ids[:, None])
        return self.model(inputs_embeds=embeds, cache=self.cache, head="image").logits[:, -1]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`DecoderLM.embed` of ``ids`` ``[b, 1]`` at :attr:`position`, without its host
        check for all-text rows (a graph cannot hold one)."""
        model = self.model
        image = model.image_vocab.embed_tokens(ids, self.position).to(model.dtype)
        if self.spec.mode == "decoupled":
            return image
        is_text = ids < self.spec.text_vocab_size
        text = model.front(ids.where(is_text, 0), None)
        return torch.where(is_text[..., None], text, image.to(text.dtype))

    def _step(self) -> torch.Tensor:
        logits = super()._step()
        self.position.add_(1)
        # Clamped for the warm-up and capture steps only; replay() stops at the last code.
        where = self.position.clamp(max=self.spec.codes_per_image - 1)
        self.codes.scatter_(1, where, self.tokens[:, None])
        return logits

    def start(self, logits: torch.Tensor) -> None:
        """Begin the next image from the prompt's last image-head logits ``[b or 1, classes]``:
        their argmax is the first code (broadcast from one row to all)."""
        self.tokens.copy_(logits.argmax(-1).expand_as(self.tokens))
        self.position.zero_()
        self.codes.zero_()
        self.codes[:, 0] = self.tokens
        self.emitted = 1

    def replay(self) -> torch.Tensor:
        """One step: the next code of every row. Returns the step's logits.

        Raises:
            ValueError: every code of the image is out already, or the model runs another task.
        """
        if self.emitted >= self.spec.codes_per_image:
            raise ValueError(
                f"all {self.spec.codes_per_image} codes of this image are out; start() the next"
            )
        logits = super().replay()
        self.emitted += 1
        return logits

    def result(self) -> GeneratedCodes:
        """The codes so far as images ``[b, grid, grid]`` (text tokens a shared vocabulary let
        through count in ``crossed`` and become code 0, as in ``generate_codes``)."""
        grid = self.spec.grid
        chosen = self.codes.view(-1, grid, grid)
        if not self._first_code:
            return GeneratedCodes(chosen.clone())
        is_code = chosen >= self._first_code
        codes = torch.where(is_code, chosen - self._first_code, 0)
        return GeneratedCodes(codes, int((~is_code).sum()))

    def generate(self, logits: torch.Tensor) -> GeneratedCodes:
        """A whole image per row after a prompt whose last image-head logits are ``logits``."""
        self.start(logits)
        for _ in range(self.spec.codes_per_image - 1):
            self.replay()
        return self.result()
