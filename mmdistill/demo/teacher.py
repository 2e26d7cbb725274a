"""The demo's embedded multimodal teacher: a small HoVLE-format model that knows its shapes.

``builtin:shapes-hovle`` is a genuine HoVLE-format directory (``config.json`` laid out as
:func:`~mmdistill.teachers.hovle_export.hovle_config` writes it, HoVLE tensor names with the
grouped ``wqkv``, an InternLM2-style sentencepiece tokenizer) holding a model of about 1.3M
parameters trained from scratch on the procedural shape images of :mod:`mmdistill.data.synthetic`.
It reads 56 px images as one tile: 4x4 patches of 14 px, pixel-shuffled into 4 image tokens, one
per cell of the images' 2x2 grid. It answers the generated questions in HoVLE's chat format, so the
demo can show a student recovering what a teacher knows.

:func:`build_shapes_teacher` is a deterministic function of :class:`ShapesTeacherConfig` (same
config, thread count and machine: bit-identical weights):

1. generate the ``"train"`` split (images, captions, question/answer turns) and a templated text
   corpus; render every example as it is prompted later (``chat_prompt``: the ``internlm2-chat``
   template with its system message, ``<img>`` + ``<IMG_CONTEXT>`` x 4 + ``</img>``); the reply
   (an answer or a caption, then ``<|im_end|>``) is tokenised on its own, so an answer is the
   same token as the word in a caption;
2. train a sentencepiece tokenizer on that text (the fixture's special tokens and settings);
3. build the canonical :class:`~mmdistill.model.DecoderLM` from the HoVLE ``config.json`` through
   the HoVLE adapter, i.e. exactly the model :func:`mmdistill.load_teacher` rebuilds;
4. warm up the image front-end alone (:func:`_warm_up_front_end`): each image token is taught to
   point at the text embeddings of the words describing its cell (colour, shape, size, row,
   column), and the LM head starts as a copy of those embeddings. Without this, attention from the
   question to the right image token takes thousands of steps to appear; with it, a few hundred;
5. train the whole model with next-token cross-entropy on answers and captions (text
   optional); every step mixes them (never batches of one question kind). All image examples
   share their first tokens (BOS, the system turn, ``<|im_start|>user\\n<img>``): that prefix
   runs once per batch and each example continues from its cached keys and values;
6. convert the weights to HoVLE's names
   (:func:`~mmdistill.teachers.hovle_export.to_hovle_state_dict`, the inverse of the adapter's
   rules) and write the directory.

:func:`evaluate_answers` measures held-out accuracy (greedy, one question per prompt, as HoVLE's
``chat()`` asks it) for any HoVLE-front-end :class:`~mmdistill.model.DecoderLM`, students
included. The question kinds the teacher is trained and evaluated on are :data:`DEMO_KINDS`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.synthetic import (
    CAPTION_PROMPT,
    COLOURS,
    QA_KINDS,
    SHAPES,
    SIZES,
    ShapeSample,
    answer_accuracy,
    generate_samples,
    write_text_corpus,
)
from ..errors import TeacherError
from ..files import sha256_file
from ..frontends.hovle import chat_prompt, prepare_images
from ..frontends.hovle_image import CHAT_TEMPLATES, IMG_CONTEXT_TOKEN, IMG_START_TOKEN
from ..generation import generate
from ..model import DecoderLM, LMConfig
from ..teachers.builtin import SHAPES_HOVLE_DIR
from ..teachers.hovle import HoVLEAdapter
from ..teachers.hovle_export import (
    HoVLESizes,
    hovle_config,
    to_hovle_state_dict,
    tokenizer_files,
    train_sentencepiece,
    write_hovle_directory,
    write_json,
)
from ..tokenizer import SentencePieceTokenizer, Tokenizer

__all__ = [
    "BUILTIN_NAME",
    "DEMO_KINDS",
    "ShapesTeacherConfig",
    "TrainedTeacher",
    "answer_questions",
    "SHIPPED_DIR",
    "build_shapes_teacher",
    "config_with_overrides",
    "evaluate_answers",
    "shipped_teacher",
    "train_teacher",
    "write_hovle_checkpoint",
]

BUILTIN_NAME = "shapes-hovle"
DEMO_KINDS: tuple[str, ...] = ("count", "colour_at", "size", "side", "colour_of_shape")
"""Question kinds the demo teacher is trained on and the demo evaluates. Left out, because a
three-minute CPU build does not learn them (they stay near the question-only baseline): the
attribute-conditioned counts ``count_shape`` and ``count_colour``, ``exists`` (a colour-shape
conjunction) and ``shape_at`` (its "on the left"/"at the top" forms need uniqueness checks)."""

RECORD_NAME = "shapes_teacher.json"
SHIPPED_DIR = SHAPES_HOVLE_DIR
"""Where the repository ships the teacher built by ``scripts/build_demo_teacher.py`` with the
default config (about 5 MB), so ``builtin:shapes-hovle`` needs no training."""
_SEP = "<|im_end|>"
_TEMPLATE = "internlm2-chat"
_ROWS = ("top", "bottom")
_COLUMNS = ("left", "right")


@dataclass(frozen=True)
class ShapesTeacherConfig:
    """Everything the demo teacher is a function of.

    Attributes:
        hidden_size: Width of both stacks.
        num_attention_heads: Query heads.
        num_key_value_heads: KV heads.
        intermediate_size: MLP width.
        num_embedding_layers: Layers of the holistic embedding module.
        num_llm_layers: LLM layers.
        image_size: Tile side in pixels (and the generated images' size).
        patch_size: Patch side; a tile becomes ``(image_size / patch_size / 2) ** 2`` tokens.
        tokenizer_vocab_size: Target sentencepiece vocabulary (every attribute word must become
            one token).
        dtype: Dtype of the written weights (``"float32"`` or ``"bfloat16"``).
        seed: Seed of the data, the initial weights and the batch order.
        n_images: Generated training images.
        max_shapes: Most shapes per image (1-4).
        kinds: Question kinds trained on (entries of ``QA_KINDS``).
        text_lines: Lines of templated text; they train the tokenizer, and the model too when
            ``text_batch_size`` is positive (plain language modelling, no image).
        warmup_front_end_steps: Steps of the front-end alignment before language modelling.
        steps: Language-modelling optimiser steps.
        batch_size: Question/answer examples per step.
        caption_batch_size: Caption examples per step ("Describe the image.").
        text_batch_size: Text examples per step (0: the step time goes to images instead).
        caption_weight: Weight of the caption loss (each part's loss is a per-token mean).
        text_weight: Weight of the text loss.
        lr: Peak learning rate (AdamW).
        warmup_steps: Linear learning-rate warm-up; then cosine decay to ``lr * final_lr_ratio``.
        final_lr_ratio: Learning rate at the last step relative to ``lr``.
        weight_decay: AdamW weight decay of matrices (not of norms, biases or tables).
        grad_clip: Gradient-norm clip.
    """

    hidden_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    num_embedding_layers: int = 2
    num_llm_layers: int = 4
    image_size: int = 56
    patch_size: int = 14
    tokenizer_vocab_size: int = 640
    dtype: str = "float32"
    seed: int = 0
    n_images: int = 6000
    max_shapes: int = 3
    kinds: tuple[str, ...] = DEMO_KINDS
    text_lines: int = 1000
    warmup_front_end_steps: int = 400
    steps: int = 760
    batch_size: int = 56
    caption_batch_size: int = 8
    text_batch_size: int = 0
    caption_weight: float = 1.0
    text_weight: float = 0.5
    lr: float = 2e-3
    warmup_steps: int = 30
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = sorted(set(self.kinds) - set(QA_KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be entries of {', '.join(QA_KINDS)}; got {self.kinds}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16'; got {self.dtype!r}")
        for name in ("steps", "batch_size", "n_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")

    def sizes(self) -> HoVLESizes:
        """The HoVLE sizes written into ``config.json`` (one tile per image, no thumbnail)."""
        return HoVLESizes(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            num_embedding_layers=self.num_embedding_layers,
            num_llm_layers=self.num_llm_layers,
            image_size=self.image_size,
            patch_size=self.patch_size,
            tokenizer_vocab_size=self.tokenizer_vocab_size,
            llm_rope_scaling=None,
            max_dynamic_patch=1,
            dynamic_image_size=False,
            use_thumbnail=False,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kinds"] = list(self.kinds)
        return data


def config_with_overrides(
    overrides: str, base: ShapesTeacherConfig | None = None
) -> ShapesTeacherConfig:
    """``base`` (default: the demo's config) with ``"key=value,key=value"`` applied.

    Values are parsed by the field's type; ``kinds`` takes ``|``-separated names.

    Raises:
        TeacherError: On an unknown key or a value that does not parse or validate.
    """
    base = base or ShapesTeacherConfig()
    types = {f.name: type(getattr(base, f.name)) for f in fields(base)}
    changes: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in types:
            raise TeacherError(f"unknown shapes-teacher setting {key!r}; known: {sorted(types)}")
        try:
            if types[key] is tuple:
                changes[key] = tuple(v.strip() for v in value.split("|") if v.strip())
            else:
                changes[key] = types[key](value.strip())
        except ValueError as exc:
            raise TeacherError(f"shapes-teacher setting {key}={value!r}: {exc}") from exc
    try:
        return replace(base, **changes)
    except ValueError as exc:
        raise TeacherError(f"shapes-teacher settings {overrides!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Data: examples rendered exactly as the model is prompted
# --------------------------------------------------------------------------------------------


@dataclass
class _Example:
    """One training sequence: ``ids``, whose tokens from ``first_target`` on are targets."""

    ids: list[int]
    first_target: int
    image: int | None  # row of the pixel tensor; None for text
    kind: str  # a question kind, "caption" or "text"


@dataclass
class _Corpus:
    samples: list[ShapeSample]
    text: list[str]
    rendered: list[tuple[str, str, int | None, str]]  # (prompt, reply, image, kind)


def _build_corpus(cfg: ShapesTeacherConfig) -> _Corpus:
    samples = generate_samples(
        cfg.n_images, cfg.seed, cfg.image_size, cfg.max_shapes, split="train", kinds=cfg.kinds
    )
    text: list[str] = []
    if cfg.text_lines:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_text_corpus(
                Path(tmp) / "text.txt", cfg.text_lines, cfg.seed, image_size=cfg.image_size
            )
            text = path.read_text(encoding="utf-8").splitlines()
    # The prompt text depends on the template and the image-token count, not on the vocabulary,
    # which does not exist yet: any placeholder ids give the same prompts.
    prompt_config = HoVLEAdapter().lm_config(hovle_config(cfg.sizes(), cfg.tokenizer_vocab_size, 0))
    caption_prompt = chat_prompt(prompt_config, CAPTION_PROMPT, [1])
    rendered: list[tuple[str, str, int | None, str]] = []
    for i, sample in enumerate(samples):
        for (question, answer), kind in zip(sample.qa, sample.qa_kinds, strict=True):
            rendered.append((chat_prompt(prompt_config, question, [1]), answer + _SEP, i, kind))
        rendered.append((caption_prompt, sample.caption + _SEP, i, "caption"))
    rendered += [("", line, None, "text") for line in text]
    return _Corpus(samples, text, rendered)


def _train_tokenizer(corpus: _Corpus, vocab_size: int, max_examples: int = 20000) -> bytes:
    """The teacher's BPE sentencepiece model (InternLM2 ids, the fixture's special tokens)."""
    lines = [CHAT_TEMPLATES[_TEMPLATE].system_message]
    for prompt, reply, _, _ in corpus.rendered[:max_examples]:
        lines += [prompt, reply] if prompt else [reply]
    lines += corpus.text
    return train_sentencepiece(lines, vocab_size)


def _tokenizer_from_proto(proto: bytes) -> tuple[SentencePieceTokenizer, dict, dict]:
    """The project tokenizer over a serialised model, plus its two JSON files."""
    sp = spm.SentencePieceProcessor(model_proto=proto)
    tokenizer_config, special_tokens_map = tokenizer_files(sp)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.model"
        path.write_bytes(proto)
        tokenizer = SentencePieceTokenizer(path, tokenizer_config)
    return tokenizer, tokenizer_config, special_tokens_map


def _tokenize(corpus: _Corpus, tokenizer: Tokenizer) -> list[_Example]:
    """Token ids of every example; prompt and reply are tokenised separately.

    The reply starts a new sentencepiece word, so ``"red"`` is ``▁red`` as an answer and in a
    caption, and the prompt's tokens are exactly those the model is given when asked.
    """
    examples = []
    for prompt, reply, image, kind in corpus.rendered:
        if image is None:
            ids = [*tokenizer.encode(reply), tokenizer.eos_token_id]
            examples.append(_Example(ids, 1, None, kind))
        else:
            head = tokenizer.encode(prompt)
            ids = head + tokenizer.encode(reply, add_special_tokens=False)
            examples.append(_Example(ids, len(head), image, kind))
    return examples


def _shared_prefix(tokenizer: Tokenizer, config: LMConfig) -> list[int]:
    """Tokens every image example starts with: up to and including ``<img>``."""
    ids = tokenizer.encode(chat_prompt(config, CAPTION_PROMPT, [1]))
    return ids[: ids.index(tokenizer.token_to_id(IMG_START_TOKEN)) + 1]


# --------------------------------------------------------------------------------------------
# Model, front-end warm-up
# --------------------------------------------------------------------------------------------


def _build_model(hf_config: dict, seed: int) -> DecoderLM:
    """The canonical model of ``hf_config`` (via the HoVLE adapter), GPT-2-style initialised.

    Values come from a private generator; the global RNG is left as it was.
    """
    config = HoVLEAdapter().lm_config(hf_config)
    with torch.random.fork_rng(devices=[]):
        model = DecoderLM(config)
    gen = torch.Generator().manual_seed(seed)
    depth = config.num_layers
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


def _cell_labels(samples: Sequence[ShapeSample], config: LMConfig) -> Tensor:
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
            cell = (_ROWS.index(shape["row"]), _COLUMNS.index(shape["column"]))
            attrs = [
                list(COLOURS).index(shape["colour"]),
                SHAPES.index(shape["shape"]),
                SIZES.index(shape["size"]),
            ]
            for t, token_cell in enumerate(cells):
                if token_cell == cell:
                    labels[n, t, :3] = torch.tensor(attrs)
    return labels


def _attribute_token_ids(tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of the colour, shape, size, row and column words (each must be one token)."""
    groups = []
    for words in (list(COLOURS), list(SHAPES), list(SIZES), list(_ROWS), list(_COLUMNS)):
        ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
        if any(len(i) != 1 for i in ids):
            raise ValueError(
                f"attribute words must be single tokens (raise tokenizer_vocab_size): "
                f"{dict(zip(words, ids, strict=True))}"
            )
        groups.append([i[0] for i in ids])
    return groups


def _warm_up_front_end(
    model: DecoderLM,
    pixels: Tensor,
    labels: Tensor,
    word_ids: list[list[int]],
    cfg: ShapesTeacherConfig,
    generator: torch.Generator,
) -> None:
    """Align each image token with the text embeddings of the words describing its cell.

    Trains the front-end (patch embedding, position table, pixel-shuffle projection) and the
    text-embedding rows of the attribute words: every (RMS-normalised) image token is classified,
    by dot products with those rows, into its cell's colour, shape and size (or a per-attribute
    "empty" vector used only here) and its row and column. Afterwards an image token resembles
    the embeddings of "red", "circle", "small", "top", "left", so attention can match it with a
    question's words from the first language-modelling step.
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
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    labels = labels.to(dev)
    for _ in range(cfg.warmup_front_end_steps):
        idx = torch.randint(len(pixels), (cfg.batch_size,), generator=generator).to(dev)
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


# --------------------------------------------------------------------------------------------
# Language-model training
# --------------------------------------------------------------------------------------------


class _Stream:
    """Endless batches of a fixed size drawn from ``indices``, reshuffled every epoch."""

    def __init__(self, indices: list[int], batch_size: int, generator: torch.Generator):
        self.indices = indices
        self.batch_size = batch_size if indices else 0
        self.generator = generator
        self.queue: list[int] = []

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if not self.queue:
                order = torch.randperm(len(self.indices), generator=self.generator).tolist()
                self.queue = [self.indices[i] for i in order]
            take = self.batch_size - len(out)
            out += self.queue[:take]
            self.queue = self.queue[take:]
        return out


def _pad(seqs: list[list[int]], first_targets: list[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad ``seqs`` into ids and next-token labels (-100 where not a target).

    ``labels[b, t] = seqs[b][t + 1]`` for ``t + 1 >= first_targets[b]``; a first target of 0
    (the token right after a shared prefix) cannot be predicted inside the row and is skipped.
    """
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for b, (seq, first) in enumerate(zip(seqs, first_targets, strict=True)):
        ids[b, : len(seq)] = torch.tensor(seq)
        start = max(first - 1, 0)
        labels[b, start : len(seq) - 1] = torch.tensor(seq[start + 1 :])
    return ids, labels


def _mean_loss(
    model: DecoderLM, examples: Sequence[_Example], pixels: Tensor, prefix: list[int], pad: int
) -> Tensor:
    """Mean next-token cross-entropy over the targets of ``examples`` (all image or all text).

    Image examples start with ``prefix``: it runs once, and every row continues from its cached
    keys and values (right padding needs no mask: causal attention never looks ahead).
    """
    dev = pixels.device
    if examples[0].image is None:
        ids, labels = _pad([e.ids for e in examples], [e.first_target for e in examples], pad)
        logits = model(ids.to(dev)).logits
    else:
        p = len(prefix)
        rest = [e.ids[p:] for e in examples]
        ids, labels = _pad(rest, [e.first_target - p for e in examples], pad)
        cache = model.new_cache(1)
        model(torch.tensor([prefix], device=dev), cache=cache, compute_logits=False)
        cache.select(torch.zeros(len(examples), dtype=torch.long, device=dev))
        images = pixels[torch.tensor([e.image for e in examples], device=dev)]
        logits = model(ids.to(dev), pixel_values=images, cache=cache).logits
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.to(dev).flatten(), ignore_index=-100
    )


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        table = "embedding" in name.rsplit(".", 2)[-2] or name.endswith("embedding")
        (no_decay if p.dim() < 2 or table else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_at(step: int, cfg: ShapesTeacherConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * cosine)


@dataclass
class TrainedTeacher:
    """What :func:`train_teacher` returns.

    Attributes:
        config: The build config.
        model: The trained model (eval mode, frozen, float32).
        hf_config: Its HoVLE ``config.json``.
        tokenizer_model: The serialised sentencepiece model.
        tokenizer: A tokenizer over it.
        losses: Language-modelling loss of every step.
        seconds: Wall time of data, tokenizer and training.
        n_examples: Training examples (questions, captions, text lines).
    """

    config: ShapesTeacherConfig
    model: DecoderLM
    hf_config: dict
    tokenizer_model: bytes
    tokenizer: SentencePieceTokenizer
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    n_examples: int = 0


def train_teacher(
    cfg: ShapesTeacherConfig,
    log: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, DecoderLM], None] | None = None,
) -> TrainedTeacher:
    """Generate the data, train the tokenizer, warm up the front-end and train the model.

    Deterministic in ``cfg`` on a given machine and thread count. The global RNG is untouched.

    Args:
        cfg: What to build.
        log: Called with a progress line now and then.
        device: Where to train.
        on_step: Called as ``on_step(step, model)`` after every step (model in eval mode).

    Returns:
        The trained teacher.
    """
    start = time.perf_counter()
    corpus = _build_corpus(cfg)
    proto = _train_tokenizer(corpus, cfg.tokenizer_vocab_size)
    tokenizer, _, _ = _tokenizer_from_proto(proto)
    hf_config = hovle_config(
        cfg.sizes(),
        tokenizer.vocab_size,
        tokenizer.token_to_id(IMG_CONTEXT_TOKEN),
        torch_dtype=cfg.dtype,
    )
    model = _build_model(hf_config, cfg.seed).to(device)
    examples = _tokenize(corpus, tokenizer)
    pixels = torch.cat([prepare_images(model.config, [s.image])[0] for s in corpus.samples])
    pixels = pixels.to(device)
    prefix = _shared_prefix(tokenizer, model.config)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    if cfg.warmup_front_end_steps:
        labels = _cell_labels(corpus.samples, model.config)
        word_ids = _attribute_token_ids(tokenizer)
        _warm_up_front_end(model, pixels, labels, word_ids, cfg, generator)
        with torch.no_grad():
            model.lm_head.weight.copy_(model.front.llm_text_embeddings.weight)
    if log:
        log(
            f"data: {len(corpus.samples)} images, {len(examples)} examples, vocabulary "
            f"{tokenizer.vocab_size}, front-end warmed up ({time.perf_counter() - start:.1f}s)"
        )
    streams = []
    for kinds, size, weight in (
        (cfg.kinds, cfg.batch_size, 1.0),
        (("caption",), cfg.caption_batch_size, cfg.caption_weight),
        (("text",), cfg.text_batch_size, cfg.text_weight),
    ):
        indices = [i for i, e in enumerate(examples) if e.kind in kinds]
        streams.append((_Stream(indices, size, generator), weight))
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98)
    )
    pad = tokenizer.eos_token_id
    losses: list[float] = []
    model.train()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = pixels.new_zeros(())
        for stream, weight in streams:
            batch = [examples[i] for i in stream.next()]
            if batch:
                loss = loss + weight * _mean_loss(model, batch, pixels, prefix, pad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            model.eval()
            on_step(step + 1, model)
            model.train()
        if log and ((step + 1) % 100 == 0 or step + 1 == cfg.steps):
            recent = losses[-100:]
            log(
                f"step {step + 1}/{cfg.steps}: loss {sum(recent) / len(recent):.3f} "
                f"({time.perf_counter() - start:.0f}s)"
            )
    model.eval()
    model.requires_grad_(False)
    return TrainedTeacher(
        config=cfg,
        model=model,
        hf_config=hf_config,
        tokenizer_model=proto,
        tokenizer=tokenizer,
        losses=losses,
        seconds=time.perf_counter() - start,
        n_examples=len(examples),
    )


# --------------------------------------------------------------------------------------------
# Writing, the built-in teacher
# --------------------------------------------------------------------------------------------


def write_hovle_checkpoint(trained: TrainedTeacher, directory: str | Path) -> Path:
    """Write ``trained`` as a HoVLE-format directory (weights in ``trained.config.dtype``)."""
    dtype = getattr(torch, trained.config.dtype)
    tensors = {k: v.to("cpu", dtype) for k, v in to_hovle_state_dict(trained.model).items()}
    return write_hovle_directory(directory, trained.hf_config, tensors, trained.tokenizer_model)


def build_shapes_teacher(
    directory: str | Path,
    cfg: ShapesTeacherConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the demo teacher and write it to ``directory`` (HoVLE format).

    Besides the HoVLE files, ``shapes_teacher.json`` records the build config, parameter count,
    losses, build time and the weights' sha256.

    Returns:
        That record.
    """
    cfg = cfg or ShapesTeacherConfig()
    trained = train_teacher(cfg, log=log)
    out = write_hovle_checkpoint(trained, directory)
    tail = trained.losses[-20:]
    record = {
        "builder": f"{__name__}.build_shapes_teacher",
        "config": cfg.to_dict(),
        "parameters": sum(p.numel() for p in trained.model.parameters()),
        "examples": trained.n_examples,
        "first_loss": trained.losses[0],
        "final_loss": sum(tail) / len(tail),
        "train_seconds": round(trained.seconds, 1),
        "threads": torch.get_num_threads(),
        "weights_sha256": sha256_file(out / "model.safetensors"),
    }
    write_json(out / RECORD_NAME, record)
    return record


def shipped_teacher(cfg: ShapesTeacherConfig | None = None) -> Path | None:
    """The teacher shipped in the package (:data:`SHIPPED_DIR`), if it was built with ``cfg``.

    Returns:
        Its directory, or ``None`` when it is absent (e.g. not packaged), incomplete, or built
        with another config or from other weights than its record states.
    """
    cfg = cfg or ShapesTeacherConfig()
    record_path = SHIPPED_DIR / RECORD_NAME
    if not record_path.exists() or not (SHIPPED_DIR / "model.safetensors").exists():
        return None
    record = json.loads(record_path.read_text())
    if record.get("config") != cfg.to_dict():
        return None
    if record.get("weights_sha256") != sha256_file(SHIPPED_DIR / "model.safetensors"):
        return None
    return SHIPPED_DIR


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_questions(
    model: DecoderLM,
    tokenizer: Tokenizer,
    questions: Sequence[tuple[Any, str]],
    batch_size: int = 64,
    max_new_tokens: int = 4,
) -> list[str]:
    """Greedy answers to ``(image, question)`` pairs, each prompted as HoVLE's ``chat()`` does.

    Args:
        model: A :class:`DecoderLM` with the HoVLE front-end (teacher or student).
        tokenizer: Its tokenizer.
        questions: ``(PIL image or path, question)`` pairs.
        batch_size: Prompts per generation batch (left-padded).
        max_new_tokens: Most answer tokens.

    Returns:
        The decoded answers (up to ``<|im_end|>``, stripped), in order.
    """
    config = model.config
    stop = tokenizer.token_to_id(_SEP)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        pixel_values, tiles = prepare_images(config, [image for image, _ in chunk])
        prompts = [
            tokenizer.encode(chat_prompt(config, question, [n]))
            for (_, question), n in zip(chunk, tiles, strict=True)
        ]
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, prompt in enumerate(prompts):
            ids[b, length - len(prompt) :] = torch.tensor(prompt)
            mask[b, length - len(prompt) :] = 1
        out = generate(
            model,
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            pixel_values=pixel_values.to(model.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stop,
            pad_token_id=pad,
        )
        for row in out[:, length:].tolist():
            answers.append(tokenizer.decode(row[: row.index(stop)] if stop in row else row).strip())
    return answers


def evaluate_answers(
    model: DecoderLM,
    tokenizer: Tokenizer,
    samples: Sequence[ShapeSample],
    batch_size: int = 64,
) -> dict[str, Any]:
    """Held-out answer accuracy, overall and per question kind.

    Args:
        model: A HoVLE-front-end :class:`DecoderLM`.
        tokenizer: Its tokenizer.
        samples: Samples whose question/answer turns are asked one per prompt.
        batch_size: Prompts per generation batch.

    Returns:
        ``{"accuracy", "questions", "per_kind": {kind: accuracy}, "counts": {kind: n},
        "predictions": [...]}``.
    """
    questions, references, kinds = [], [], []
    for sample in samples:
        for (question, answer), kind in zip(sample.qa, sample.qa_kinds, strict=True):
            questions.append((sample.image, question))
            references.append(answer)
            kinds.append(kind)
    predictions = answer_questions(model, tokenizer, questions, batch_size=batch_size)
    per_kind, counts = {}, {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        per_kind[kind] = answer_accuracy(
            [predictions[i] for i in idx], [references[i] for i in idx]
        )
        counts[kind] = len(idx)
    return {
        "accuracy": answer_accuracy(predictions, references),
        "questions": len(references),
        "per_kind": per_kind,
        "counts": counts,
        "predictions": predictions,
    }
