"""Text-to-image generation with a student's recurrent cache: captions -> image codes.

Each prompt is ``<|t2i|> <|sot|> caption <|eot|> <|soi|>``; the ``grid * grid`` codes follow in
raster order, one decode step each, from the image head (so only codes can be emitted with
decoupled vocabularies; with a shared vocabulary a text token can win, and is counted in
``crossed`` and replaced by code 0 in the image). Rows of different caption lengths are
left-padded.

Classifier-free guidance (``cfg_scale > 0``): every conditional row has an unconditional twin
(the caption dropped, as in training with ``omni.caption_dropout``) in the same batch; the
logits used are ``uncond + cfg_scale * (cond - uncond)`` and both twins are fed the chosen code.
``cfg_scale = 0`` uses the conditional rows alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cached_forward import prefill, sample_next
from .data.t2i import t2i_prompt
from .errors import CheckpointError
from .model import DecoderLM


@dataclass
class GeneratedCodes:
    """Generated images as codes ``[n, grid, grid]`` and how many text tokens were emitted."""

    codes: torch.Tensor
    crossed: int = 0


@dataclass
class Sampling:
    """Greedy (``temperature`` 0) or sampled decoding with optional top-k and guidance.

    ``decode`` is the path (:mod:`mmdistill.generation`'s ``auto``, ``graph`` or ``eager``):
    ``auto`` replays a captured step on CUDA for greedy decoding without guidance
    (:func:`mmdistill.t2i_evaluation.image_codes`)."""

    temperature: float = 0.0
    top_k: int = 0
    cfg_scale: float = 0.0
    generator: torch.Generator | None = None
    decode: str = "auto"


def check_t2i_student(model: DecoderLM) -> None:
    """Raises CheckpointError for a model without an image vocabulary."""
    if model.image_vocab is None:
        raise CheckpointError(
            "this student has no image vocabulary, so it cannot generate images; train it with "
            "an OmniMamba recipe (task stages with an 'omni' section, e.g. recipes/omni-shapes.yaml)"
        )


def batch_prompts(model: DecoderLM, captions: list[list[int]], guided: bool):
    """Left-padded prompt ids and mask; unconditional twins appended when ``guided``."""
    spec = model.image_vocab.spec
    rows = [t2i_prompt(spec, ids) for ids in captions]
    if guided:
        rows += [t2i_prompt(spec, [])] * len(captions)
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    return ids.to(model.device), mask.to(model.device)


def _guide(logits: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    if not scale:
        return logits
    cond, uncond = logits[:n].float(), logits[n:].float()
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def generate_codes(
    model: DecoderLM, captions: list[list[int]], sampling: Sampling | None = None
) -> GeneratedCodes:
    """Generate one image per caption (token ids, without special tokens).

    Returns:
        :class:`GeneratedCodes` with codes ``[len(captions), grid, grid]``.
    """
    check_t2i_student(model)
    sampling = sampling or Sampling()
    spec = model.image_vocab.spec
    model.use_task("t2i")
    n, guided = len(captions), sampling.cfg_scale > 0
    ids, mask = batch_prompts(model, captions, guided)
    cache = model.new_cache(ids.shape[0])
    logits = prefill(model, cache, ids, attention_mask=mask, head="image")
    first_code = spec.text_vocab_size if spec.mode == "shared" else 0
    codes, crossed = [], 0
    for j in range(spec.codes_per_image):
        chosen = sample_next(
            _guide(logits, n, sampling.cfg_scale),
            sampling.temperature > 0,
            sampling.temperature or 1.0,
            sampling.top_k,
            1.0,
            sampling.generator,
        )
        is_code = chosen >= first_code
        crossed += int((~is_code).sum())
        codes.append(torch.where(is_code, chosen - first_code, 0))
        if j == spec.codes_per_image - 1:
            break
        token = torch.where(is_code, codes[-1] + spec.code_offset, chosen)
        token = token.repeat(2) if guided else token
        embeds = model.embed(token[:, None], image_positions=torch.full_like(token[:, None], j))
        logits = model(inputs_embeds=embeds, cache=cache, head="image").logits[:, -1]
    grid = torch.stack(codes, dim=1).view(n, spec.grid, spec.grid)
    return GeneratedCodes(grid, crossed)
