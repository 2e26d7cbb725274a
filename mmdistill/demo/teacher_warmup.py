"""The demo teacher's starting point: initial weights and the image front-end's warm-up.

:func:`init_weights` gives the canonical model GPT-2-style initial values from a private
generator. :func:`warm_up_front_end` then teaches each image token to point at the text
embeddings of the words describing its cell of the 2x2 grid (colour, shape, size, row, column)
and starts the LM head as a copy of the text embeddings. Without it, attention from a question
to the right image token takes thousands of steps to appear; with it, a few hundred.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.synthetic import COLOURS, SHAPES, SIZES, ShapeSample
from ..errors import TeacherError
from ..lm_config import LMConfig
from ..model import DecoderLM
from ..tokenizer import Tokenizer

__all__ = [
    "attribute_token_ids",
    "cell_labels",
    "init_weights",
    "warm_up_front_end",
]

ROWS = ("top", "bottom")
COLUMNS = ("left", "right")


def init_weights(model: DecoderLM, seed: int) -> DecoderLM:
    """Norms 1, biases and the class embedding 0, every other tensor N(0, 0.02).

    Output projections (``o_proj``, ``down_proj``) are scaled by ``1 / sqrt(2 * layers)``.
    Values come from a private generator; the global RNG is left as it was.

    Returns:
        ``model``, initialised in place.
    """
    gen = torch.Generator().manual_seed(seed)
    depth = model.config.num_layers
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias") or name.endswith("class_embedding"):
                p.zero_()
            else:
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * depth)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def cell_labels(samples: Sequence[ShapeSample], config: LMConfig) -> Tensor:
    """Per image token: colour, shape, size (last class = empty cell), row and column.

    Returns:
        ``[n, num_image_token, 5]`` class indices.
    """
    tokens = int(config.front_end["num_image_token"])
    side = math.isqrt(tokens)
    cells = [((i // side) * 2 // side, (i % side) * 2 // side) for i in range(tokens)]
    labels = torch.tensor(
        [[len(COLOURS), len(SHAPES), len(SIZES), row, column] for row, column in cells]
    ).repeat(len(samples), 1, 1)
    for n, sample in enumerate(samples):
        for shape in sample.shapes:
            cell = (ROWS.index(shape["row"]), COLUMNS.index(shape["column"]))
            attrs = [
                list(COLOURS).index(shape["colour"]),
                SHAPES.index(shape["shape"]),
                SIZES.index(shape["size"]),
            ]
            for t, token_cell in enumerate(cells):
                if token_cell == cell:
                    labels[n, t, :3] = torch.tensor(attrs)
    return labels


ATTRIBUTE_WORDS = (tuple(COLOURS), SHAPES, SIZES, ROWS, COLUMNS)


def attribute_token_ids(tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of the colour, shape, size, row and column words (``▁red``).

    Raises:
        TeacherError: If a word is not one token.
    """
    groups = []
    for words in ATTRIBUTE_WORDS:
        ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
        if any(len(i) != 1 for i in ids):
            raise TeacherError(
                f"attribute words must be single tokens (raise tokenizer_vocab_size): "
                f"{dict(zip(words, ids, strict=True))}"
            )
        groups.append([i[0] for i in ids])
    return groups


def warm_up_front_end(
    model: DecoderLM,
    pixels: Tensor,
    labels: Tensor,
    word_ids: list[list[int]],
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> None:
    """Align each image token with the text embeddings of the words describing its cell.

    Trains the front-end (patch embedding, position table, pixel-shuffle projection) and the
    text-embedding rows of the attribute words: every (RMS-normalised) image token is classified,
    by dot products with those rows, into its cell's colour, shape and size (or a per-attribute
    "empty" vector used only here) and its row and column. Afterwards an image token resembles
    the embeddings of "red", "circle", "small", "top", "left", so attention can match it with a
    question's words from the first language-modelling step. Finally the LM head starts as a copy
    of the text embeddings, so an image token's words are likely answers from the start.

    Args:
        model: The freshly initialised teacher.
        pixels: ``[images, 3, s, s]`` one tile per image.
        labels: :func:`cell_labels` of those images.
        word_ids: :func:`attribute_token_ids`.
        steps: Optimiser steps.
        batch_size: Images per step.
        lr: AdamW learning rate (no weight decay).
        generator: Draws the batches (and the "empty" vectors).
    """
    front = model.front
    hidden = model.config.hidden_size
    dev = pixels.device
    table = front.llm_text_embeddings.weight
    empty = nn.Parameter((torch.randn(3, hidden, generator=generator) * 0.02).to(dev))
    params = [
        *front.vision_embeddings.parameters(),
        *front.pixel_shuffle_proj.parameters(),
        table,
        empty,
    ]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    labels = labels.to(dev)
    for _ in range(steps):
        idx = torch.randint(len(pixels), (batch_size,), generator=generator).to(dev)
        feats = F.rms_norm(front.image_features(pixels[idx]), (hidden,))
        target = labels[idx]
        loss = feats.new_zeros(())
        for k, ids in enumerate(word_ids):
            vectors = torch.cat([table[ids], empty[k : k + 1]]) if k < 3 else table[ids]
            logits = (feats @ vectors.T).flatten(0, 1)
            loss = loss + F.cross_entropy(logits, target[..., k].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.lm_head.weight.copy_(table)
