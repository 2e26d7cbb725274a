"""The demo teacher's training set, rendered and tokenised by the distillation data pipeline.

:func:`build_training_set` writes the generated ``"train"`` images as InternVL/LLaVA conversation
records with :func:`~mmdistill.data.synthetic.write_multimodal_jsonl`, the writer of
``builtin:shapes``: per image a *dialogue* of all its questions (here in a random order) and a
*caption* conversation; beside them one single-*question* conversation per question, as HoVLE's
``chat()`` asks it. It trains the tokenizer on those conversations as the chat template renders
them and turns every record into token ids and image tiles with
:class:`~mmdistill.data.conversations.ConversationSource`, the code ``mmdistill run`` and
``mmdistill eval`` read conversations with. So the teacher learns exactly the token sequences it
is later distilled and evaluated on.

Targets are the assistant turns (each answer or caption and its ``<|im_end|>``). Each turn's
start is where the prompt HoVLE's ``chat()`` builds for it (:func:`turn_prompts`: the question,
the earlier turns as history) ends: that prompt must tokenise as a prefix of the conversation,
and the build fails if it does not. The tokenizer normalises a newline to a newline and a space
(:func:`~mmdistill.teachers.hovle_export.train_sentencepiece`), so an answer after
``<|im_start|>assistant\n`` is the same token as the word in a caption or a question
(``▁red``), and the prompt's final newline never merges with the answer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..chat import record_messages
from ..data.conversations import ConversationSource
from ..data.synthetic import (
    CAPTION_PROMPT,
    ShapeSample,
    generate_samples,
    write_multimodal_jsonl,
    write_text_corpus,
)
from ..data.text import DataContext, LineFile, TextSource
from ..errors import TeacherError
from ..frontends.hovle import chat_prompt, expand_prompt
from ..frontends.hovle_image import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_START_TOKEN,
    build_chat_prompt,
    render_chat,
)
from ..lm_config import LMConfig
from ..teachers.hovle import HoVLEAdapter
from ..teachers.hovle_export import hovle_config, train_sentencepiece, write_tokenizer
from ..tokenizer import Tokenizer, load_tokenizer
from .teacher_config import ShapesTeacherConfig

__all__ = [
    "Example",
    "ImageTable",
    "TrainingSet",
    "build_training_set",
    "conversation_examples",
    "turn_prompts",
]

END_OF_TURN = "<|im_end|>"
TOKENIZER_EXAMPLES = 20000
"""Most conversations the tokenizer is trained on (the text corpus comes on top)."""


@dataclass
class Example:
    """One training sequence.

    Attributes:
        ids: Token ids, as :class:`ConversationSource` or :class:`TextSource` produce them.
        targets: ``targets[j]``: token ``j`` is predicted (from position ``j - 1``).
        image: Row of :attr:`TrainingSet.pixels`, or ``None`` for text.
        kind: ``"question"`` (one question/answer turn), ``"dialogue"`` (several),
            ``"caption"`` or ``"text"``.
    """

    ids: list[int]
    targets: list[bool]
    image: int | None
    kind: str


@dataclass
class TrainingSet:
    """What :func:`build_training_set` returns.

    Attributes:
        samples: The generated images with their ground truth (questions in training order).
        examples: Every training sequence.
        pixels: ``[images, 3, s, s]`` one tile per image.
        prefix: Tokens every image example starts with (BOS to ``<img>``).
        hf_config: The teacher's HoVLE ``config.json``.
        config: The canonical config the HoVLE adapter makes of it.
        tokenizer_model: The serialised sentencepiece model.
        tokenizer: The project tokenizer over it.
    """

    samples: list[ShapeSample]
    examples: list[Example]
    pixels: Tensor
    prefix: list[int]
    hf_config: dict
    config: LMConfig
    tokenizer_model: bytes
    tokenizer: Tokenizer


def turn_prompts(config: LMConfig, messages: list[dict[str, str]], tiles: list[int]) -> list[str]:
    """HoVLE ``chat()``'s prompt for each assistant turn of ``messages``.

    Turn ``k``'s prompt asks its question with the earlier question/answer pairs as history
    (the first question carries the ``<image>`` placeholder, as ``chat()`` stores it).

    Args:
        config: A HoVLE-front-end model config (template, image tokens per tile).
        messages: Alternating user/assistant messages, optionally a system message first.
        tiles: Tiles per image.
    """
    template = config.front_end.get("template") or "internlm2-chat"
    tokens = int(config.front_end["num_image_token"])
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = [m for m in messages if m["role"] != "system"]
    prompts = []
    for k in range(1, len(turns), 2):
        history = [(turns[j]["content"], turns[j + 1]["content"]) for j in range(0, k - 1, 2)]
        question = turns[k - 1]["content"]
        prompts.append(build_chat_prompt(question, tiles, tokens, template, history, system))
    return prompts


def _assistant_targets(
    ids: list[int], prompts: list[str], tokenizer: Tokenizer, where: str
) -> list[bool]:
    """Targets of a conversation: after each prompt, up to and including ``<|im_end|>``."""
    end = tokenizer.token_to_id(END_OF_TURN)
    targets = [False] * len(ids)
    for prompt in prompts:
        head = tokenizer.encode(prompt)
        if ids[: len(head)] != head:
            raise TeacherError(
                f"{where}: the chat prompt does not tokenise as a prefix of the conversation, "
                "so the answer HoVLE's chat() is asked for is not the one trained on"
            )
        stop = ids.index(end, len(head))
        targets[len(head) : stop + 1] = [True] * (stop + 1 - len(head))
    return targets


def _shuffle_questions(samples: list[ShapeSample], seed: int) -> list[ShapeSample]:
    """Each sample's questions in a random order, so every kind is also asked first."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 17]))
    out = []
    for s in samples:
        order = rng.permutation(len(s.qa)).tolist()
        qa = [s.qa[i] for i in order]
        out.append(dataclasses.replace(s, qa=qa, qa_kinds=[s.qa_kinds[i] for i in order]))
    return out


def _tokenizer_lines(jsonl: Path, config: LMConfig, text: Path | None) -> list[str]:
    """The conversations as the chat template renders them (placeholders expanded), and text."""
    template = config.front_end.get("template") or "internlm2-chat"
    records = LineFile(jsonl, TOKENIZER_EXAMPLES)
    lines = []
    for i in range(len(records)):
        messages, images = record_messages(records.record(i), f"{jsonl}: record {i}")
        rendered = render_chat(messages, template, add_generation_prompt=False)
        lines.append(expand_prompt(config, rendered, [1] * len(images)))
    if text is not None:
        lines += text.read_text(encoding="utf-8").splitlines()
    return lines


def _write_questions(dialogues: Path) -> Path:
    """One single-turn record per question of the dialogue records, beside them.

    The question is written without ``<image>``: the pipeline puts the placeholder in front of
    the first user turn, as HoVLE's ``chat()`` does.
    """
    records = LineFile(dialogues)
    lines = []
    for i in range(len(records)):
        record = records.record(i)
        if record.get("task") != "qa":
            continue
        turns = record["conversations"]
        for j in range(0, len(turns) - 1, 2):
            question = turns[j]["value"].removeprefix(IMAGE_PLACEHOLDER + "\n")
            conversation = [{"from": "human", "value": question}, turns[j + 1]]
            single = {"id": f"{record['id']}-{j // 2}", "task": "qa", "image": record["image"]}
            lines.append(json.dumps(single | {"conversations": conversation}))
    path = dialogues.with_name("questions.jsonl")
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _write_data(cfg: ShapesTeacherConfig, workdir: Path) -> tuple[list[ShapeSample], list[Path]]:
    """Write the conversations (dialogues and captions, single questions) and the text corpus.

    Returns:
        The samples, and the paths of the two conversation files and, with ``text_lines``, the
        text corpus.
    """
    samples = generate_samples(
        cfg.n_images, cfg.seed, cfg.image_size, cfg.max_shapes, split="train", kinds=cfg.kinds
    )
    samples = _shuffle_questions(samples, cfg.seed)
    dialogues = write_multimodal_jsonl(samples, workdir, "train", include_captions=True)
    paths = [dialogues, _write_questions(dialogues)]
    if cfg.text_lines:
        paths.append(
            write_text_corpus(
                workdir / "text.txt", cfg.text_lines, cfg.seed, image_size=cfg.image_size
            )
        )
    return samples, paths


def _tokenizer(cfg: ShapesTeacherConfig, jsonl: Path, text: Path | None, out: Path) -> Path:
    """Train the tokenizer on the rendered conversations and text; write its files to ``out``."""
    # Rendering depends on the template and the image-token count, not on the vocabulary,
    # which does not exist yet: placeholder ids give the same text.
    draft = HoVLEAdapter().lm_config(hovle_config(cfg.sizes(), cfg.tokenizer_vocab_size, 0))
    lines = _tokenizer_lines(jsonl, draft, text)
    proto = train_sentencepiece(lines, cfg.tokenizer_vocab_size, space_after_newline=True)
    return write_tokenizer(out, proto)


class ImageTable:
    """Distinct images by path: a row each, and their tiles in row order."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.tiles: list[Tensor] = []

    def row(self, path: str, tiles: Tensor) -> int:
        """The row of ``path``, adding ``tiles`` the first time it is seen."""
        if path not in self.rows:
            self.rows[path] = len(self.tiles)
            self.tiles.append(tiles)
        return self.rows[path]


def conversation_examples(
    source: ConversationSource, tokenizer: Tokenizer, images: ImageTable
) -> list[Example]:
    """Every conversation of ``source`` as :class:`ConversationSource` tokenises it, with targets.

    Args:
        source: Conversation records with one image each (``builtin:shapes`` records).
        tokenizer: The tokenizer of ``source``'s context.
        images: Where the records' images are collected (``example.image`` is a row of it).

    Returns:
        The examples: ``"caption"`` for caption records, else ``"question"`` or ``"dialogue"``
        by the number of answers.

    Raises:
        TeacherError: For a record without an image, or one whose chat prompts do not tokenise
            as prefixes of the conversation.
    """
    examples = []
    for i in range(len(source)):
        where = f"{source.name}: record {i}"
        record = source.lines.record(i)
        sample = source.get(i)
        if sample is None or sample.pixel_values is None:
            raise TeacherError(f"{where}: no image")
        messages, _ = record_messages(record, where)
        prompts = turn_prompts(source.ctx.config, messages, [1])
        targets = _assistant_targets(sample.input_ids, prompts, tokenizer, where)
        kind = "question" if len(prompts) == 1 else "dialogue"
        if record.get("task") == "caption":
            kind = "caption"
        row = images.row(record["image"], sample.pixel_values)
        examples.append(Example(sample.input_ids, targets, row, kind))
    return examples


def build_training_set(cfg: ShapesTeacherConfig, workdir: str | Path) -> TrainingSet:
    """Generate, write, render and tokenise the demo teacher's training data.

    Args:
        cfg: The build config.
        workdir: An empty directory for the conversations, images, text and tokenizer files.

    Returns:
        The training set.
    """
    workdir = Path(workdir)
    samples, paths = _write_data(cfg, workdir)
    dialogues, questions, text = paths[0], paths[1], paths[2] if len(paths) > 2 else None
    tokenizer_dir = _tokenizer(cfg, dialogues, text, workdir / "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    hf_config = hovle_config(
        cfg.sizes(),
        tokenizer.vocab_size,
        tokenizer.token_to_id(IMG_CONTEXT_TOKEN),
        torch_dtype=cfg.dtype,
    )
    config = HoVLEAdapter().lm_config(hf_config)
    ctx = DataContext(config, str(tokenizer_dir))
    images = ImageTable()
    examples = []
    for path in (dialogues, questions):
        examples += conversation_examples(ConversationSource(path, ctx), tokenizer, images)
    if cfg.text_batch_size and text is not None:
        lines = TextSource(text, ctx)
        for i in range(len(lines)):
            ids = lines.get(i).input_ids
            examples.append(Example(ids, [False] + [True] * (len(ids) - 1), None, "text"))
    head = tokenizer.encode(chat_prompt(config, CAPTION_PROMPT, [1]))
    prefix = head[: head.index(tokenizer.token_to_id(IMG_START_TOKEN)) + 1]
    if any(e.image is not None and e.ids[: len(prefix)] != prefix for e in examples):
        raise TeacherError("image conversations do not share their first tokens")
    proto = (tokenizer_dir / "tokenizer.model").read_bytes()
    return TrainingSet(
        samples, examples, torch.cat(images.tiles), prefix, hf_config, config, proto, tokenizer
    )
