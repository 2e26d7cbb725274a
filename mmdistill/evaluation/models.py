"""Models and tokenizers for evaluation: a student directory or any teacher source."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import MODEL_TYPE
from ..errors import DataError
from ..model import DecoderLM, load_student
from ..teachers import load_teacher
from ..tokenizer import Tokenizer, load_tokenizer


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
