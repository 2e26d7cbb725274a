"""Building the demo teacher, ``builtin:shapes-hovle``: training and writing it.

Only ``scripts/build_demo_teacher.py`` and the tests import this module; ``mmdistill demo``
uses the shipped directory (:data:`~mmdistill.demo.teacher.SHIPPED_DIR`).

:func:`build_shapes_teacher` is a deterministic function of
:class:`~mmdistill.demo.teacher_config.ShapesTeacherConfig` (same config, thread count and
machine: bit-identical weights):

1. the training set (:func:`~mmdistill.demo.teacher_data.build_training_set`): generated
   ``"train"`` images written as conversation records, a tokenizer trained on them as the chat
   template renders them, and every record tokenised by the distillation data pipeline;
2. the canonical :class:`~mmdistill.model.DecoderLM` of the HoVLE ``config.json`` (through the
   HoVLE adapter, i.e. exactly the model :func:`mmdistill.load_teacher` rebuilds), initialised
   and its image front-end warmed up (:mod:`mmdistill.demo.teacher_warmup`);
3. next-token cross-entropy on the assistant turns (answers and captions; text optional), every
   step mixing question/answer and caption conversations, with the trainer's learning-rate
   schedule (:func:`mmdistill.training.schedule.lr_multiplier`) and weight-decay groups
   (:func:`mmdistill.training.schedule.param_groups`). All image conversations share their first
   tokens (BOS, the system turn, ``<|im_start|>user\\n<img>``): that prefix runs once per batch
   and each conversation continues from its cached keys and values;
4. the weights under HoVLE's names (:func:`~mmdistill.teachers.hovle_export.to_hovle_state_dict`)
   written as a HoVLE-format directory with ``shapes_teacher.json`` (config, losses, time, sha256).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..files import sha256_file
from ..model import DecoderLM
from ..teachers.hovle_export import to_hovle_state_dict, write_hovle_directory, write_json
from ..tokenizer import Tokenizer
from ..training.schedule import lr_multiplier, param_groups
from .teacher import RECORD_NAME, SHIPPED_DIR
from .teacher_config import ShapesTeacherConfig
from .teacher_data import Example, TrainingSet, build_training_set
from .teacher_warmup import (
    attribute_token_ids,
    cell_labels,
    init_weights,
    warm_up_front_end,
)

__all__ = [
    "TrainedTeacher",
    "build_shapes_teacher",
    "shipped_teacher",
    "train_teacher",
    "write_teacher",
]


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
        n_examples: Training sequences (conversations and text lines).
    """

    config: ShapesTeacherConfig
    model: DecoderLM
    hf_config: dict
    tokenizer_model: bytes
    tokenizer: Tokenizer
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    n_examples: int = 0


class _Stream:
    """Endless batches of a fixed size drawn from ``indices``, reshuffled every epoch."""

    def __init__(self, indices: list[int], batch_size: int, generator: torch.Generator):
        self.indices = indices
        self.batch_size = batch_size if indices else 0
        self.generator = generator
        self.queue: list[int] = []

    def next(self) -> list[int]:
        """The next batch of indices."""
        out: list[int] = []
        while len(out) < self.batch_size:
            if not self.queue:
                order = torch.randperm(len(self.indices), generator=self.generator).tolist()
                self.queue = [self.indices[i] for i in order]
            take = self.batch_size - len(out)
            out += self.queue[:take]
            self.queue = self.queue[take:]
        return out


def _pad(examples: Sequence[Example], start: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids from position ``start`` on, and next-token labels (-100: no target).

    ``labels[b, t] = ids[b][start + t + 1]`` where that token is a target.
    """
    rows = [e.ids[start:] for e in examples]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for b, (row, example) in enumerate(zip(rows, examples, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        for t in range(len(row) - 1):
            if example.targets[start + t + 1]:
                labels[b, t] = row[t + 1]
    return ids, labels


def _mean_loss(
    model: DecoderLM, examples: Sequence[Example], data: TrainingSet, pixels: Tensor
) -> Tensor:
    """Mean next-token cross-entropy over the targets of ``examples`` (all image or all text).

    Image examples start with ``data.prefix``: it runs once, and every row continues from its
    cached keys and values (right padding needs no mask: causal attention never looks ahead).
    """
    dev = pixels.device
    pad = data.tokenizer.eos_token_id
    if examples[0].image is None:
        ids, labels = _pad(examples, 0, pad)
        logits = model(ids.to(dev)).logits
    else:
        ids, labels = _pad(examples, len(data.prefix), pad)
        cache = model.new_cache(1)
        model(torch.tensor([data.prefix], device=dev), cache=cache, compute_logits=False)
        cache.select(torch.zeros(len(examples), dtype=torch.long, device=dev))
        images = pixels[torch.tensor([e.image for e in examples], device=dev)]
        logits = model(ids.to(dev), pixel_values=images, cache=cache).logits
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.to(dev).flatten(), ignore_index=-100
    )


def _new_model(data: TrainingSet, cfg: ShapesTeacherConfig, pixels: Tensor) -> DecoderLM:
    """The initialised teacher, its front-end warmed up when ``cfg`` asks for it."""
    with torch.random.fork_rng(devices=[]):
        model = DecoderLM(data.config)
    init_weights(model, cfg.seed).to(pixels.device)
    if cfg.warmup_front_end_steps:
        warm_up_front_end(
            model,
            pixels,
            cell_labels(data.samples, data.config),
            attribute_token_ids(data.tokenizer),
            steps=cfg.warmup_front_end_steps,
            batch_size=cfg.warmup_front_end_batch_size,
            lr=cfg.lr,
            generator=torch.Generator().manual_seed(cfg.seed + 2),
        )
    return model


def _optimise(
    model: DecoderLM,
    data: TrainingSet,
    pixels: Tensor,
    cfg: ShapesTeacherConfig,
    log: Callable[[str], None],
) -> list[float]:
    """Train on the assistant turns for ``cfg.steps`` steps; the loss of every step."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    streams = []
    for kind, size, weight in (
        ("question", cfg.batch_size, 1.0),
        ("dialogue", cfg.dialogue_batch_size, cfg.dialogue_weight),
        ("caption", cfg.caption_batch_size, cfg.caption_weight),
        ("text", cfg.text_batch_size, cfg.text_weight),
    ):
        indices = [i for i, e in enumerate(data.examples) if e.kind == kind]
        streams.append((_Stream(indices, size, generator), weight))
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.schedule, cfg.steps))
    losses: list[float] = []
    model.train()
    for step in range(cfg.steps):
        loss = pixels.new_zeros(())
        for stream, weight in streams:
            batch = [data.examples[i] for i in stream.next()]
            if batch:
                loss = loss + weight * _mean_loss(model, batch, data, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            recent = losses[-100:]
            log(f"step {step + 1}/{cfg.steps}: loss {sum(recent) / len(recent):.3f}")
    model.eval()
    model.requires_grad_(False)
    return losses


def train_teacher(
    cfg: ShapesTeacherConfig,
    log: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
) -> TrainedTeacher:
    """Build the training set, warm up the front-end and train the model.

    Deterministic in ``cfg`` on a given machine and thread count. The global RNG is untouched.

    Args:
        cfg: What to build.
        log: Called with a progress line now and then.
        device: Where to train.

    Returns:
        The trained teacher.
    """
    start = time.perf_counter()

    def say(line: str) -> None:
        if log is not None:
            log(f"{line} ({time.perf_counter() - start:.0f}s)")

    with tempfile.TemporaryDirectory() as workdir:
        data = build_training_set(cfg, workdir)
    pixels = data.pixels.to(device)
    model = _new_model(data, cfg, pixels)
    say(
        f"data: {len(data.samples)} images, {len(data.examples)} conversations, vocabulary "
        f"{data.tokenizer.vocab_size}, front-end warmed up"
    )
    losses = _optimise(model, data, pixels, cfg, say)
    return TrainedTeacher(
        config=cfg,
        model=model,
        hf_config=data.hf_config,
        tokenizer_model=data.tokenizer_model,
        tokenizer=data.tokenizer,
        losses=losses,
        seconds=time.perf_counter() - start,
        n_examples=len(data.examples),
    )


def write_teacher(trained: TrainedTeacher, directory: str | Path) -> Path:
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
    out = write_teacher(trained, directory)
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
