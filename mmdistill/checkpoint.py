"""Student (and teacher) checkpoints in Hugging Face layout.

A directory holds ``config.json`` (the full :class:`~mmdistill.model.LMConfig`: layout, mixer
settings, the teacher's own config and provenance), ``model.safetensors`` (or shards with an
index), ``generation_config.json`` and the teacher's tokenizer/processor files. It is written to a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import __version__
from .errors import CheckpointError
from .io import atomic_directory, read_safetensors, save_sharded
from .model import DecoderLM, LMConfig

MODEL_TYPE = "mmdistill"


def config_document(model: DecoderLM) -> dict:
    data = model.config.to_dict()
    data["version"] = __version__
    return {"model_type": MODEL_TYPE, "architectures": ["DecoderLM"], **data}


def save_pretrained(
    model: DecoderLM,
    directory: str | Path,
    overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` to ``directory`` atomically; returns the directory."""
    from .teachers.loading import TOKENIZER_FILES

    directory = Path(directory)
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
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
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory


def load_student(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> DecoderLM:
    """Rebuild a model written by :func:`save_pretrained`, without its teacher."""
    from .teachers.loading import build_from_state_dict

    directory = Path(directory)
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
    # Tokenizer files travel with the student: point provenance at this directory for re-saves.
    config.teacher = {**config.teacher, "directory": str(directory.resolve())}
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tensors = read_safetensors(directory)
    try:
        model = build_from_state_dict(config, tensors, dtype)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not match config.json: {exc}") from exc
    return model.to(device)
