"""Quality of a student against its teacher: perplexity, KL, top-1 agreement and answer accuracy.

:func:`evaluate` (one student) and :func:`evaluate_many` (several students sharing one teacher
forward per batch) read text and conversation data, run teacher and students on the same token
sequences, and return plain dicts (the ``--json`` document of ``mmdistill eval``).

**Data.** ``.txt`` files are one document each. ``.jsonl`` files hold one record per line:
``{"text": ...}`` is a document; ``{"conversations": [...], "image": path | [paths]}`` is a
conversation in the LLaVA/InternVL convention (``from`` = ``human``/``user``, ``gpt``/``assistant``
or ``system``; image paths relative to the JSONL file; ``<image>`` in a human turn marks where the
image goes; when no turn has one, one per image is put before the first human turn).

**What is scored.** Documents are cut into windows of ``seq_len`` tokens; consecutive windows
share one token, so every token of a document but its first is predicted exactly once, from the
context inside its window (no context carries across windows). Conversations are rendered with
the model's chat template (HoVLE's ``internlm2-chat`` with image tokens expanded, the tokenizer's
Jinja template for HF models, or ``question\\nanswer\\n`` when there is none) and scored whole,
on the answer tokens only: each assistant turn's text and the template's end-of-turn marker.
``max_tokens`` caps the scored tokens of each file (the last window or record is cut short).

**Metrics**, over scored tokens, natural log: ``teacher_nll``/``student_nll`` (mean negative
log-likelihood of the data), ``teacher_ppl``/``student_ppl`` = exp of those, ``kl`` = mean
KL(teacher ‖ student) = ``Σ_v p_T(v) (log p_T(v) − log p_S(v))`` per token, ``top1_agreement`` =
share of tokens where both models' argmax agree. For conversation records of question/answer
data (``"task": "qa"``, or no ``task`` and a one-word reference answer), each answer is also
generated greedily after the question (earlier turns given with their reference answers) and
compared with :func:`mmdistill.data.synthetic.answer_accuracy`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import MODEL_TYPE
from .data.synthetic import answer_accuracy
from .errors import DataError, MmdistillError
from .frontends.hovle import expand_prompt, is_hovle, prepare_images
from .frontends.hovle_image import render_chat
from .generation import generate
from .model import DecoderLM, load_student
from .teachers import load_teacher
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ChatFormat",
    "EvalFile",
    "Question",
    "ScoredSequence",
    "build_generation_prompt",
    "chat_format_for",
    "evaluate",
    "evaluate_many",
    "load_model",
    "prepare_file",
    "run_lm_eval",
    "tokenizer_for",
]

IMAGE_PLACEHOLDER = "<image>"
_TEXT_BLOCK_CHARS = 1 << 16  # .txt files are tokenised in blocks of whole lines this long
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


# --------------------------------------------------------------------------------------------
# Models and tokenizers
# --------------------------------------------------------------------------------------------


def is_student_dir(source: str | Path) -> bool:
    """True when ``source`` is a directory whose ``config.json`` says ``model_type`` mmdistill."""
    path = Path(source) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, OSError):
        return False


def load_model(
    source: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu"
) -> DecoderLM:
    """A student directory (``load_student``) or any teacher source (``load_teacher``)."""
    if is_student_dir(source):
        return load_student(source, dtype=dtype, device=device)
    return load_teacher(str(source), dtype=dtype, device=device)


def tokenizer_for(model: DecoderLM) -> Tokenizer:
    """The tokenizer saved with ``model`` (its checkpoint or its teacher's directory)."""
    directory = model.config.teacher.get("directory")
    if not directory:
        raise DataError("the model records no directory with tokenizer files; pass tokenizer=")
    return load_tokenizer(directory)


def describe(model: DecoderLM) -> str:
    """The layout in words, e.g. ``"15 attention + 15 mamba layers"``."""
    types = model.config.layer_types
    n_mamba = types.count("mamba")
    return f"{len(types) - n_mamba} attention + {n_mamba} mamba layers"


# --------------------------------------------------------------------------------------------
# Chat formats
# --------------------------------------------------------------------------------------------


@dataclass
class ChatFormat:
    """How a model's conversations are rendered and tokenised.

    Attributes:
        kind: ``"hovle"``, ``"template"`` (the tokenizer's Jinja chat template) or ``"plain"``.
        render: ``render(messages, add_generation_prompt) -> str`` with ``<image>`` left in.
        add_special_tokens: passed to ``tokenizer.encode`` for rendered text (False when the
            template writes its own BOS).
        stop_ids: token ids that end a generated answer.
        multimodal: whether the model takes images (a HoVLE front-end).
        stop_text: generated text is cut at its first occurrence (the plain format's newline).
    """

    kind: str
    render: Callable[[Sequence[Mapping[str, str]], bool], str]
    add_special_tokens: bool
    stop_ids: list[int]
    multimodal: bool = False
    stop_text: str | None = None


def _eos_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def chat_format_for(
    model: DecoderLM, tokenizer: Tokenizer, use_template: bool = True
) -> ChatFormat:
    """The chat format of ``model``: HoVLE's template, the tokenizer's template, or plain text.

    Args:
        model: teacher or student.
        tokenizer: its tokenizer.
        use_template: False forces the plain format (raw prompts for base models).

    Returns:
        A :class:`ChatFormat`.
    """
    stops = _eos_list(model.config.eos_token_id)
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    multimodal = is_hovle(model.config)
    if use_template and multimodal:
        template = model.config.front_end.get("template") or "internlm2-chat"
        end = tokenizer.token_to_id("<|im_end|>")
        stops += [end] if end is not None else []

        def render_hovle(messages: Sequence[Mapping[str, str]], gen: bool) -> str:
            try:
                return render_chat(messages, template, add_generation_prompt=gen)
            except ValueError as exc:
                raise DataError(str(exc)) from exc

        return ChatFormat("hovle", render_hovle, True, sorted(set(stops)), True)
    inner = getattr(tokenizer, "inner", None)
    if use_template and inner is not None and getattr(inner, "chat_template", None):

        def render_template(messages: Sequence[Mapping[str, str]], gen: bool) -> str:
            return inner.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=gen
            )

        end = tokenizer.token_to_id("<|im_end|>")
        stops += [end] if end is not None else []
        return ChatFormat("template", render_template, False, sorted(set(stops)), multimodal)

    def render_plain(messages: Sequence[Mapping[str, str]], gen: bool) -> str:
        return "".join(f"{m['content']}\n" for m in messages if m["role"] != "system")

    return ChatFormat("plain", render_plain, True, sorted(set(stops)), multimodal, "\n")


def _expand(model_config, text: str, tiles: Sequence[int]) -> str:
    """Expand the ``<image>`` placeholders of ``text`` (HoVLE) with the first images' tiles."""
    count = text.count(IMAGE_PLACEHOLDER)
    if count > len(tiles):
        raise DataError(f"{count} {IMAGE_PLACEHOLDER} placeholders but {len(tiles)} images")
    return expand_prompt(model_config, text, list(tiles[:count]))


def _image_tiles(model_config, images: Sequence[Path]) -> tuple[torch.Tensor | None, list[int]]:
    return prepare_images(model_config, list(images))


def build_generation_prompt(
    model: DecoderLM,
    tokenizer: Tokenizer,
    prompt: str,
    images: Sequence[str | Path] = (),
    use_template: bool = True,
) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """Token ids (and image tiles) of a one-turn prompt, as the model's chat format writes it.

    Args:
        model: teacher or student.
        tokenizer: its tokenizer.
        prompt: the user's text (``<image>`` optional; prepended when images are given).
        images: image paths (HoVLE-format models only).
        use_template: False feeds ``prompt`` raw (plus the tokenizer's BOS).

    Returns:
        ``(ids, pixel_values [tiles, 3, s, s] or None, stop_ids)``.

    Raises:
        DataError: images for a text-only model, a missing or unreadable image.
    """
    fmt = chat_format_for(model, tokenizer, use_template)
    paths = [Path(p) for p in images]
    if paths and not fmt.multimodal:
        raise DataError("this model has a text-only front-end; it cannot take images")
    if paths and IMAGE_PLACEHOLDER not in prompt:
        prompt = IMAGE_PLACEHOLDER + "\n" + prompt
    if not paths and IMAGE_PLACEHOLDER in prompt and fmt.multimodal:
        raise DataError(f"the prompt has {IMAGE_PLACEHOLDER} but no image was given")
    pixel_values, tiles = _image_tiles(model.config, paths) if paths else (None, [])
    text = fmt.render([{"role": "user", "content": prompt}], True) if use_template else prompt
    if fmt.multimodal:
        text = _expand(model.config, text, tiles)
    add_special = fmt.add_special_tokens if use_template else True
    return tokenizer.encode(text, add_special_tokens=add_special), pixel_values, fmt.stop_ids


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class ScoredSequence:
    """One model input.

    Attributes:
        ids: token ids, length ``l``.
        targets: length ``l``; ``targets[j]`` is True when token ``j`` (``j >= 1``) is scored,
            i.e. predicted from the logits at ``j - 1``.
        images: image files whose tiles fill the sequence's image tokens, in order.
    """

    ids: list[int]
    targets: list[bool]
    images: list[Path] = field(default_factory=list)

    @property
    def scored(self) -> int:
        return sum(self.targets)


@dataclass
class Question:
    """A question to answer by greedy generation.

    Attributes:
        ids: the prompt (conversation so far, ending with the assistant prefix).
        images: image files of the prompt.
        question: the question text (for reports).
        reference: the reference answer.
    """

    ids: list[int]
    images: list[Path]
    question: str
    reference: str


@dataclass
class EvalFile:
    """One data file, tokenised.

    Attributes:
        path: the file.
        kind: ``"text"``, ``"conversations"`` or ``"mixed"``.
        documents: documents or records read.
        sequences: what is scored.
        questions: questions for answer accuracy.
    """

    path: Path
    kind: str
    documents: int
    sequences: list[ScoredSequence]
    questions: list[Question]

    @property
    def tokens(self) -> int:
        return sum(s.scored for s in self.sequences)


def _special_affixes(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Tokens ``encode`` adds before and after a text (e.g. ``[bos]``, ``[]``)."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _windows(ids: list[int], seq_len: int, quota: int | None) -> list[ScoredSequence]:
    """Cut a document into windows of ``seq_len`` sharing one token; at most ``quota`` targets."""
    out = []
    start = 0
    while start < len(ids) - 1 and (quota is None or quota > 0):
        window = ids[start : start + seq_len]
        n = len(window) - 1 if quota is None else min(len(window) - 1, quota)
        window = window[: n + 1]
        out.append(ScoredSequence(window, [False] + [True] * n))
        quota = None if quota is None else quota - n
        start += seq_len - 1
    return out


def _text_blocks(path: Path) -> Iterator[str]:
    """A text file in blocks of whole lines (so a token cap needs only part of a big file)."""
    block: list[str] = []
    size = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            block.append(line)
            size += len(line)
            if size >= _TEXT_BLOCK_CHARS:
                yield "".join(block)
                block, size = [], 0
    if block:
        yield "".join(block)


def _document_ids(
    blocks: Iterator[str] | Sequence[str], tokenizer: Tokenizer, need: int | None
) -> list[int]:
    """Encode a document given in blocks; stop early once ``need`` tokens are there."""
    prefix, suffix = _special_affixes(tokenizer)
    ids = list(prefix)
    for block in blocks:
        ids.extend(tokenizer.encode(block, add_special_tokens=False))
        if need is not None and len(ids) >= need:
            return ids
    return ids + suffix


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _messages(record: dict, where: str) -> list[dict[str, str]]:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or "value" not in turn:
            raise DataError(f"{where}: each conversation turn needs 'from' and 'value'")
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(
                f"{where}: unknown speaker {turn.get('from')!r}; expected one of {sorted(_ROLES)}"
            )
        messages.append({"role": role, "content": str(turn["value"])})
    return messages


def _record_images(record: dict, base: Path, where: str) -> list[Path]:
    image = record.get("image")
    if image is None:
        return []
    names = image if isinstance(image, list) else [image]
    paths = [base / str(name) for name in names]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{where}: image file not found: {p}")
    return paths


def _is_question(record: dict, reference: str) -> bool:
    task = record.get("task")
    if task is not None:
        return task == "qa"
    return len(reference.split()) == 1


@dataclass
class _Context:
    model_config: Any
    tokenizer: Tokenizer
    fmt: ChatFormat


def _conversation(
    record: dict, base: Path, where: str, ctx: _Context
) -> tuple[ScoredSequence, list[Question]]:
    """Tokenise one conversation record: answer-token targets, and its questions."""
    messages = _messages(record, where)
    images = _record_images(record, base, where)
    if images and not ctx.fmt.multimodal:
        raise DataError(f"{where}: the record has images but the model has no image front-end")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if images and placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: no human turn to attach the image to")
        first_user["content"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + first_user["content"]
        placeholders = len(images)
    if ctx.fmt.multimodal and placeholders != len(images):
        raise DataError(
            f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images"
        )
    tiles = _image_tiles(ctx.model_config, images)[1] if images else []

    def text(upto: int, gen: bool) -> str:
        rendered = ctx.fmt.render(messages[:upto], gen)
        return _expand(ctx.model_config, rendered, tiles) if ctx.fmt.multimodal else rendered

    def encode(s: str) -> list[int]:
        return ctx.tokenizer.encode(s, add_special_tokens=ctx.fmt.add_special_tokens)

    full = text(len(messages), False)
    ids = encode(full)
    targets = [False] * len(ids)
    questions = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = text(k, True)
        done = text(k + 1, False)
        if not (full.startswith(prompt) and full.startswith(done)):
            raise DataError(
                f"{where}: the chat template does not render conversations as prefixes of each "
                "other, so answer tokens cannot be located"
            )
        prompt_ids = encode(prompt)
        start = _common_prefix(prompt_ids, ids)
        stop = _common_prefix(encode(done), ids)
        for j in range(max(start, 1), stop):
            targets[j] = True
        question = messages[k - 1]["content"] if k and messages[k - 1]["role"] == "user" else ""
        if _is_question(record, message["content"]):
            question = question.replace(IMAGE_PLACEHOLDER, "").strip()
            questions.append(Question(prompt_ids, images, question, message["content"]))
    return ScoredSequence(ids, targets, images), questions


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{where}: each line must be a JSON object")
            yield where, record


def prepare_file(
    path: str | Path,
    model: DecoderLM,
    tokenizer: Tokenizer,
    seq_len: int = 512,
    max_tokens: int | None = None,
    max_questions: int | None = None,
    use_template: bool = True,
) -> EvalFile:
    """Read and tokenise one data file (see the module docstring for formats and scoring).

    Args:
        path: a ``.txt`` or ``.jsonl`` file.
        model: the teacher (its config decides templates and image preprocessing).
        tokenizer: the tokenizer shared by teacher and students.
        seq_len: window length for documents.
        max_tokens: cap on scored tokens (``None``: the whole file).
        max_questions: cap on questions for answer accuracy (``None``: all read).
        use_template: False renders conversations as plain ``question\\nanswer\\n`` text.

    Returns:
        An :class:`EvalFile`.

    Raises:
        DataError: missing file, unknown extension, malformed records, missing images.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        need = None if max_tokens is None else max_tokens + 1
        ids = _document_ids(_text_blocks(path), tokenizer, need)
        return EvalFile(path, "text", 1, _windows(ids, seq_len, max_tokens), [])
    if suffix != ".jsonl":
        raise DataError(f"{path}: unsupported data file; use .txt or .jsonl")
    ctx = _Context(model.config, tokenizer, chat_format_for(model, tokenizer, use_template))
    sequences: list[ScoredSequence] = []
    questions: list[Question] = []
    kinds = set()
    documents = 0
    quota = max_tokens
    for where, record in _read_jsonl(path):
        if quota is not None and quota <= 0:
            break
        documents += 1
        if "conversations" in record:
            kinds.add("conversations")
            seq, qs = _conversation(record, path.parent, where, ctx)
            if quota is not None:
                kept = [j for j, t in enumerate(seq.targets) if t][:quota]
                cut = set(kept)
                seq.targets = [j in cut for j in range(len(seq.ids))]
            if seq.scored:
                sequences.append(seq)
                quota = None if quota is None else quota - seq.scored
            questions.extend(qs)
        elif isinstance(record.get("text"), str):
            kinds.add("text")
            ids = _document_ids([record["text"]], tokenizer, None)
            windows = _windows(ids, seq_len, quota)
            sequences.extend(windows)
            quota = None if quota is None else quota - sum(w.scored for w in windows)
        else:
            raise DataError(f"{where}: a record needs 'text' or 'conversations'")
    if max_questions is not None:
        questions = questions[:max_questions]
    kind = "mixed" if len(kinds) > 1 else (kinds.pop() if kinds else "text")
    return EvalFile(path, kind, documents, sequences, questions)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class _Sums:
    """Running sums over scored tokens (float64 on the host)."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0


def _batch_inputs(
    batch: Sequence[ScoredSequence], pad_id: int, model_config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded ``ids [b, l]``, ``targets [b, l]`` and the batch's image tiles."""
    length = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    targets = torch.zeros(len(batch), length, dtype=torch.bool)
    for i, s in enumerate(batch):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        targets[i, : len(s.ids)] = torch.tensor(s.targets)
    images = [p for s in batch for p in s.images]
    pixel_values = _image_tiles(model_config, images)[0] if images else None
    return ids, targets, pixel_values


def _scored_log_probs(
    model: DecoderLM, ids: torch.Tensor, targets: torch.Tensor, pixel_values: torch.Tensor | None
) -> torch.Tensor:
    """Log-probabilities ``[n, vocab]`` (float32) at the positions predicting scored tokens.

    Right padding needs no mask: every layer is causal, so real tokens never see the padding.
    """
    device = model.device
    pv = pixel_values.to(device) if pixel_values is not None else None
    out = model(input_ids=ids.to(device), pixel_values=pv, compute_logits=False)
    hidden = out.last_hidden_state[:, :-1][targets[:, 1:].to(device)]
    return F.log_softmax(model.lm_head(hidden).float(), dim=-1)


@torch.no_grad()
def _score_file(
    teacher: DecoderLM,
    students: Mapping[str, DecoderLM],
    data: EvalFile,
    batch_size: int,
    pad_id: int,
    advance: Callable[[int], None],
) -> tuple[_Sums, dict[str, _Sums]]:
    teacher_sums = _Sums()
    sums = {name: _Sums() for name in students}
    for start in range(0, len(data.sequences), batch_size):
        batch = data.sequences[start : start + batch_size]
        ids, targets, pixel_values = _batch_inputs(batch, pad_id, teacher.config)
        labels = ids[:, 1:][targets[:, 1:]]
        t_logp = _scored_log_probs(teacher, ids, targets, pixel_values)
        labels = labels.to(t_logp.device)
        t_argmax = t_logp.argmax(-1)
        t_prob = t_logp.exp()
        n = labels.numel()
        teacher_sums.tokens += n
        teacher_sums.nll -= t_logp.gather(-1, labels[:, None]).sum().double().item()
        for name, student in students.items():
            s_logp = _scored_log_probs(student, ids, targets, pixel_values).to(t_logp.device)
            s = sums[name]
            s.tokens += n
            s.nll -= s_logp.gather(-1, labels[:, None]).sum().double().item()
            s.kl += (t_prob * (t_logp - s_logp)).sum().double().item()
            s.agree += int((s_logp.argmax(-1) == t_argmax).sum())
        advance(len(batch))
    return teacher_sums, sums


@torch.no_grad()
def _answers(
    model: DecoderLM,
    questions: Sequence[Question],
    tokenizer: Tokenizer,
    fmt: ChatFormat,
    batch_size: int,
    max_new_tokens: int,
    pad_id: int,
    advance: Callable[[int], None],
) -> list[str]:
    """Greedy answers to ``questions`` (left-padded batches), cut at the first stop token."""
    answers = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        length = max(len(q.ids) for q in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for i, q in enumerate(batch):
            ids[i, length - len(q.ids) :] = torch.tensor(q.ids)
            mask[i, length - len(q.ids) :] = 1
        images = [p for q in batch for p in q.images]
        pixel_values = _image_tiles(model.config, images)[0] if images else None
        device = model.device
        out = generate(
            model,
            ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixel_values.to(device) if pixel_values is not None else None,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(fmt.stop_ids),
            pad_token_id=pad_id,
        )
        for row in out[:, length:].tolist():
            cut = next((i for i, t in enumerate(row) if t in fmt.stop_ids), len(row))
            text = tokenizer.decode(row[:cut], skip_special_tokens=True)
            if fmt.stop_text:
                text = text.split(fmt.stop_text)[0]
            answers.append(text.strip())
        advance(len(batch))
    return answers


def _metrics(teacher: _Sums, student: _Sums) -> dict[str, Any]:
    n = student.tokens
    if n == 0:
        return {
            "tokens": 0,
            "teacher_nll": None,
            "student_nll": None,
            "teacher_ppl": None,
            "student_ppl": None,
            "kl": None,
            "top1_agreement": None,
        }
    return {
        "tokens": n,
        "teacher_nll": teacher.nll / n,
        "student_nll": student.nll / n,
        "teacher_ppl": math.exp(teacher.nll / n),
        "student_ppl": math.exp(student.nll / n),
        "kl": student.kl / n,
        "top1_agreement": student.agree / n,
    }


def _add(total: _Sums, part: _Sums) -> None:
    total.tokens += part.tokens
    total.nll += part.nll
    total.kl += part.kl
    total.agree += part.agree


def _progress(enabled: bool, total: int):
    """A rich progress bar on stderr (or a no-op) and its ``advance(n)`` callback."""
    if not enabled or total == 0:
        return nullcontext(), lambda n: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task("evaluating", total=total)
    return progress, lambda n: progress.advance(task, n)


def evaluate_many(
    students: Mapping[str, DecoderLM],
    teacher: DecoderLM,
    files: Sequence[str | Path],
    *,
    tokenizer: Tokenizer | None = None,
    max_tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int = 1,
    answers: bool = True,
    max_questions: int | None = None,
    max_new_tokens: int = 16,
    use_template: bool = True,
    progress: bool = False,
    examples: int = 3,
) -> dict[str, dict[str, Any]]:
    """Evaluate several students against one teacher on the same data (one teacher pass).

    Args:
        students: name -> student (any :class:`DecoderLM`: a teacher itself works too).
        teacher: the reference model; its config decides templates and image preprocessing.
        files: ``.txt`` / ``.jsonl`` data files.
        tokenizer: defaults to the one saved with the teacher.
        max_tokens: cap on scored tokens per file.
        seq_len: window length for documents.
        batch_size: sequences per forward (and prompts per generation batch).
        answers: generate answers to QA turns for answer accuracy.
        max_questions: cap on questions per file.
        max_new_tokens: answer length limit.
        use_template: False renders conversations as plain text.
        progress: show a progress bar on stderr.
        examples: question/answer examples to keep per file.

    Returns:
        ``{name: result}`` with each result as :func:`evaluate` returns it.
    """
    if not files:
        raise DataError("no data files to evaluate")
    if tokenizer is None:
        tokenizer = tokenizer_for(teacher)
    for name, student in students.items():
        if student.config.vocab_size != teacher.config.vocab_size:
            raise MmdistillError(
                f"student {name!r} has vocabulary {student.config.vocab_size}, the teacher "
                f"{teacher.config.vocab_size}: they must share a tokenizer"
            )
    start_time = time.perf_counter()
    prepared = [
        prepare_file(f, teacher, tokenizer, seq_len, max_tokens, max_questions, use_template)
        for f in files
    ]
    fmt = chat_format_for(teacher, tokenizer, use_template)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = fmt.stop_ids[0] if fmt.stop_ids else 0
    n_questions = sum(len(d.questions) for d in prepared) if answers else 0
    work = sum(len(d.sequences) for d in prepared) + n_questions * (1 + len(students))
    bar, advance = _progress(progress, work)

    def answer(model: DecoderLM, questions: Sequence[Question]) -> list[str]:
        return _answers(
            model, questions, tokenizer, fmt, batch_size, max_new_tokens, pad_id, advance
        )

    teacher_total = _Sums()
    totals = {name: _Sums() for name in students}
    per_file: dict[str, list[dict[str, Any]]] = {name: [] for name in students}
    refs: list[str] = []  # over all files, with the answers below
    teacher_answers: list[str] = []
    student_answers: dict[str, list[str]] = {name: [] for name in students}
    with bar:
        for data in prepared:
            t_sums, s_sums = _score_file(teacher, students, data, batch_size, pad_id, advance)
            _add(teacher_total, t_sums)
            questions = data.questions if answers else []
            file_refs = [q.reference for q in questions]
            file_teacher = answer(teacher, questions) if questions else []
            refs += file_refs
            teacher_answers += file_teacher
            for name, student in students.items():
                _add(totals[name], s_sums[name])
                file_student = answer(student, questions) if questions else []
                student_answers[name] += file_student
                entry = {
                    "path": str(data.path),
                    "kind": data.kind,
                    "documents": data.documents,
                    **_metrics(t_sums, s_sums[name]),
                    "answer_accuracy": _accuracy(file_refs, file_teacher, file_student),
                }
                if questions and examples:
                    entry["examples"] = [
                        {
                            "question": q.question,
                            "reference": q.reference,
                            "teacher": file_teacher[i],
                            "student": file_student[i],
                        }
                        for i, q in enumerate(questions[:examples])
                    ]
                per_file[name].append(entry)
    seconds = time.perf_counter() - start_time
    return {
        name: {
            "teacher_layout": describe(teacher),
            "student_layout": describe(student),
            **_metrics(teacher_total, totals[name]),
            "answer_accuracy": _accuracy(refs, teacher_answers, student_answers[name]),
            "seq_len": seq_len,
            "max_tokens": max_tokens,
            "seconds": round(seconds, 3),
            "files": per_file[name],
        }
        for name, student in students.items()
    }


def _accuracy(
    refs: Sequence[str], teacher: Sequence[str], student: Sequence[str]
) -> dict[str, Any] | None:
    if not refs:
        return None
    return {
        "teacher": answer_accuracy(teacher, refs),
        "student": answer_accuracy(student, refs),
        "questions": len(refs),
    }


def evaluate(
    student: DecoderLM | str | Path,
    teacher: DecoderLM | str | Path,
    files: Sequence[str | Path],
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a student against its teacher.

    Args:
        student: a model or a source for :func:`load_model`.
        teacher: a model or a source for :func:`load_model`.
        files: ``.txt`` / ``.jsonl`` data files.
        **kwargs: options of :func:`evaluate_many`.

    Returns:
        ``teacher_layout``, ``student_layout`` (layer counts), ``tokens``, ``teacher_nll``, ``student_nll``,
        ``teacher_ppl``, ``student_ppl``, ``kl``, ``top1_agreement``, ``answer_accuracy``
        (``{"teacher", "student", "questions"}`` or ``None``), ``seq_len``, ``max_tokens``,
        ``seconds`` and ``files`` (the same metrics per file, with ``path``, ``kind``,
        ``documents`` and a few answer ``examples``).
    """
    if not isinstance(teacher, DecoderLM):
        teacher = load_model(teacher)
    if not isinstance(student, DecoderLM):
        student = load_model(student)
    return evaluate_many({"student": student}, teacher, files, **kwargs)["student"]


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness
# --------------------------------------------------------------------------------------------


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness can be imported."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _harness_model(model: DecoderLM, tokenizer: Tokenizer, max_length: int):
    """``model`` wrapped as an ``lm_eval.api.model.LM`` (log-likelihoods and greedy generation)."""
    from lm_eval.api.model import LM

    prefix, _ = _special_affixes(tokenizer)

    class HarnessLM(LM):
        def _logprob(self, context: str, continuation: str) -> tuple[float, bool]:
            ctx = prefix + tokenizer.encode(context, add_special_tokens=False)
            cont = tokenizer.encode(continuation, add_special_tokens=False)
            ids = (ctx + cont)[-max_length:]
            n = min(len(cont), len(ids) - 1)
            x = torch.tensor([ids], device=model.device)
            with torch.no_grad():
                logits = model(x).logits[0, -n - 1 : -1].float()
            logp = F.log_softmax(logits, -1)
            target = x[0, -n:]
            total = float(logp.gather(-1, target[:, None]).sum())
            return total, bool((logits.argmax(-1) == target).all())

        def loglikelihood(self, requests):
            return [self._logprob(*r.args[:2]) for r in requests]

        def loglikelihood_rolling(self, requests):
            out = []
            for r in requests:
                ids = prefix + tokenizer.encode(r.args[0], add_special_tokens=False)
                total = 0.0
                for w in _windows(ids, max_length, None):
                    x = torch.tensor([w.ids], device=model.device)
                    with torch.no_grad():
                        logp = F.log_softmax(model(x).logits[0, :-1].float(), -1)
                    total += float(logp.gather(-1, x[0, 1:, None]).sum())
                out.append(total)
            return out

        def generate_until(self, requests):
            out = []
            for r in requests:
                context, kwargs = r.args[0], dict(r.args[1] or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = (prefix + tokenizer.encode(context, add_special_tokens=False))[-max_length:]
                x = torch.tensor([ids], device=model.device)
                new = generate(model, x, max_new_tokens=int(kwargs.get("max_gen_toks", 256)))
                text = tokenizer.decode(new[0, len(ids) :].tolist())
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return HarnessLM()


def run_lm_eval(
    model: DecoderLM,
    tokenizer: Tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    max_length: int = 2048,
    include_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on ``model`` (offline: task data must be local).

    Args:
        model: any :class:`DecoderLM`.
        tokenizer: its tokenizer.
        tasks: harness task names.
        limit: examples per task.
        max_length: longest context fed to the model (left-truncated).
        include_path: a directory of extra task YAML files (e.g. tasks over local JSON data).

    Returns:
        The harness's per-task ``results`` dict.

    Raises:
        DataError: lm-eval is not installed, or a task or its data cannot be loaded.
    """
    if not lm_eval_available():
        raise DataError(
            "--tasks needs lm-evaluation-harness: pip install lm-eval (task data must then be "
            "local: in the Hugging Face datasets cache, or tasks of your own via --include-path)"
        )
    from lm_eval.evaluator import evaluate as harness_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    try:
        manager = TaskManager(include_path=str(include_path) if include_path else None)
        task_dict = get_task_dict(list(tasks), manager)
    except Exception as exc:  # the harness raises many types for unknown tasks and missing data
        raise DataError(
            f"lm-eval could not load task(s) {', '.join(tasks)}: {type(exc).__name__}: {exc}. "
            "Check the task names and that their data is available offline."
        ) from exc
    results = harness_evaluate(
        lm=_harness_model(model, tokenizer, max_length),
        task_dict=task_dict,
        limit=limit,
        bootstrap_iters=0,
        log_samples=False,
        verbosity="WARNING",
    )
    return results.get("results", {}) if results else {}
