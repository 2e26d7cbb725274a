"""Student (and teacher) checkpoints in Hugging Face layout.

A directory holds ``config.json`` (the full :class:`~mmdistill.lm_config.LMConfig`: layout, mixer
settings, the teacher's own config and provenance), ``model.safetensors`` (or shards with an
index), ``generation_config.json`` and the teacher's tokenizer/processor files. A student with
an image vocabulary also has the t2i layout tokens in its tokenizer files; one with task LoRA
adapters keeps them in ``model.safetensors`` (what :func:`~mmdistill.model.load_student` reads)
and, for peft users, under ``adapters/NAME/`` in peft's layout. It is written to a
temporary name and renamed when complete. :func:`mmdistill.model.load_student` reads one back.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import CheckpointError
from .files import TOKENIZER_FILES, atomic_directory, save_sharded
from .image_vocab import LAYOUT_TOKENS
from .lm_config import LMConfig
from .task_lora import LoraSpec, save_adapters
from .tokenizer import add_tokens_to_files
from .version import __version__

MODEL_TYPE = "mmdistill"
IMAGE_TOKENIZER_DIR = "image_tokenizer"


def config_document(model) -> dict:
    """The ``config.json`` document of ``model`` (a :class:`~mmdistill.model.DecoderLM`)."""
    data = model.config.to_dict()
    data["version"] = __version__
    return {"model_type": MODEL_TYPE, "architectures": ["DecoderLM"], **data}


def state_to_save(state: dict[str, torch.Tensor], config: LMConfig) -> dict[str, torch.Tensor]:
    """A model's tensors as written to disk: a head tied to the token embeddings is left out
    (safetensors refuses two names for one tensor; loading ties it again)."""
    if config.tie_word_embeddings:
        return {k: v for k, v in state.items() if k != "lm_head.weight"}
    return dict(state)


def save_pretrained(
    model,
    directory: str | Path,
    overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
    extra_files: dict[str, str] | None = None,
    image_tokenizer=None,
) -> Path:
    """Write ``model`` (a :class:`~mmdistill.model.DecoderLM`) to ``directory`` atomically,
    with the image tokenizer its image vocabulary reads (under ``image_tokenizer/``) if given.

    Returns:
        The directory.
    """
    directory = Path(directory)
    state = state_to_save(model.state_dict(), model.config)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_sharded(state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config_document(model), indent=2))
        gen = {
            k: getattr(model.config, k)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(model.config, k) is not None
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        source = model.config.teacher.get("directory")
        if source and Path(source).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(source) / name).exists():
                    shutil.copy2(Path(source) / name, tmp / name)
        if model.config.image_vocab is not None:
            add_tokens_to_files(tmp, LAYOUT_TOKENS, model.config.vocab_size)
        if image_tokenizer is not None:
            image_tokenizer.save(tmp / IMAGE_TOKENIZER_DIR)
        if model.config.lora is not None:
            save_adapters(model, LoraSpec.from_dict(model.config.lora), tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory


GATES_FILE = "gates.json"
"""Beside a student whose run checked quality gates: the verdict (:mod:`mmdistill.gates`)."""
_WRITTEN = re.compile(
    r"config\.json|generation_config\.json|gates\.json|model\.safetensors(\.index\.json)?"
    r"|model-\d+-of-\d+\.safetensors|adapters|" + re.escape(IMAGE_TOKENIZER_DIR)
)


def _is_student(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def check_replaceable(
    directory: str | Path,
    kind: str = "student",
    owned: Callable[[dict], bool] = _is_student,
    extra_names: tuple[str, ...] = (),
) -> None:
    """Raise unless ``directory`` is missing, empty, or a folder mmdistill wrote (its
    ``config.json`` passes ``owned``: a ``kind``, by default a student) holding only the files
    it writes (a student's, plus ``extra_names``): what ``--force`` may replace without losing
    anyone's files.

    Raises:
        CheckpointError: naming the files that would be lost.
    """
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    known = (*TOKENIZER_FILES, *extra_names)
    foreign = sorted(
        p.name for p in directory.iterdir() if not (_WRITTEN.fullmatch(p.name) or p.name in known)
    )
    try:
        ours = owned(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError):
        ours = False
    if foreign or not ours:
        names = ", ".join(foreign[:5])
        what = f"files mmdistill did not write ({names})" if foreign else f"no mmdistill {kind}"
        raise CheckpointError(
            f"--force replaces only what mmdistill wrote, and {directory} holds {what}; "
            "move them, or choose another --out"
        )


def read_student_config(directory: Path) -> LMConfig:
    """The :class:`~mmdistill.lm_config.LMConfig` of a student directory, with its provenance
    pointing at ``directory`` (tokenizer files travel with the student).

    Raises:
        CheckpointError: no config, invalid JSON, not an mmdistill student, or unknown keys.
    """
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} is not an mmdistill checkpoint (no config.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if data.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{directory} is not an mmdistill student (model_type {data.get('model_type')!r}); "
            "load teachers with mmdistill.load_teacher"
        )
    try:
        config = LMConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    config.teacher = {**config.teacher, "directory": str(directory.resolve())}
    return config
