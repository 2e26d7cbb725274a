"""Turning a student into a unified (understanding + generation) student and back.

:func:`add_image_vocabulary` gives a :class:`~mmdistill.model.DecoderLM` an image vocabulary
(:mod:`mmdistill.image_vocab`) and task LoRA adapters (:mod:`mmdistill.task_lora`): every existing
weight is kept bit for bit, the new tables start at the text embeddings' scale and the adapters'
B matrices at zero, so the new student computes exactly what the old one did on text and images.
:func:`merge_task` folds one task's adapter into the base weights: a plain per-task model.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from .errors import CheckpointError
from .image_vocab import ImageVocabSpec, ImageVocabulary
from .model import DecoderLM
from .task_lora import LoraSpec, add_adapters, merge_into_base


def add_image_vocabulary(
    student: DecoderLM, spec: ImageVocabSpec, lora: LoraSpec | None, seed: int = 0
) -> DecoderLM:
    """A copy of ``student`` with an image vocabulary and (optionally) task adapters.

    Raises:
        CheckpointError: the student already has an image vocabulary, or ``spec`` names another
            text vocabulary size.
    """
    config = student.config
    if config.image_vocab is not None:
        raise CheckpointError("this student already has an image vocabulary")
    if spec.text_vocab_size != config.vocab_size:
        raise CheckpointError(
            f"image_vocab.text_vocab_size {spec.text_vocab_size} != the student's vocabulary "
            f"{config.vocab_size}"
        )
    with torch.device("meta"):  # no random init of a copy of every existing weight
        new = DecoderLM(replace(config, image_vocab=spec.to_dict(), lora=None))
    missing, unexpected = new.load_state_dict(student.state_dict(), strict=False, assign=True)
    assert not unexpected and all(k.startswith("image_vocab.") for k in missing), missing
    if config.tie_word_embeddings:
        new.lm_head.weight = new.front.token_embeddings().weight
    for rotary in new.rotary:
        rotary.reset_frequencies(student.device)
    with torch.random.fork_rng(devices=[]):  # the projector's default init, from ``seed``
        torch.manual_seed(seed)
        vocab = ImageVocabulary(spec, config.hidden_size)
    generator = torch.Generator().manual_seed(seed)
    vocab.init_from_text(new.front.token_embeddings().weight.detach().cpu(), generator)
    new.image_vocab = vocab.to(device=student.device, dtype=student.dtype)
    if lora is not None:
        add_adapters(new, lora)
        new.config.lora = lora.to_dict()
    return new.train(student.training)


@torch.no_grad()
def merge_task(student: DecoderLM, task: str) -> DecoderLM:
    """A plain model for ``task``: its adapter folded into the base weights, no adapters left.

    The image vocabulary stays, so one merged model per task serves that task alone.
    """
    if student.config.lora is None:
        raise CheckpointError("this student has no LoRA adapters to merge")
    adapter = LoraSpec.from_dict(student.config.lora).adapter_for(task)
    merged = copy.deepcopy(student)
    merge_into_base(merged, adapter)
    merged.config = replace(
        student.config, lora=None, teacher={**student.config.teacher, "merged_task": task}
    )
    return merged.eval()
