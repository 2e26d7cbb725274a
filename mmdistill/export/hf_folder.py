"""``mmdistill export``: a saved student written as a stock Hugging Face folder.

:func:`export_student` writes ``config.json`` (``GraniteMoeHybridForCausalLM``, plus an
``mmdistill`` provenance entry), safetensors (sharded past 2 GiB, with the standard index), the
student's tokenizer files, ``generation_config.json`` and a model card, into a temporary folder
renamed into place when complete. Nothing is written for a student the target cannot express:
the error lists every reason (:func:`~mmdistill.export.granite.export_blockers`).

A pure-Mamba export sets ``use_cache: false``: stock transformers 5.24 raises ``ValueError``
(``get_seq_length`` on a cache without attention layers) in any forward with the cache of a
``GraniteMoeHybrid`` model that has no attention layer, so its ``generate()`` recomputes
instead. vLLM and SGLang keep their own state and ignore the flag.

Stock transformers before 5.23 normalises a ``GraniteMoeHybrid`` mixer's gated output over the
whole width instead of per group (vLLM, SGLang and mamba-ssm's kernels normalise per group, as
our mixers do): such a release loads the export without complaint and computes something else.
:func:`load_export` refuses those releases (:data:`STOCK_TRANSFORMERS_MIN`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoint import check_replaceable, read_student_config
from ..errors import CheckpointError
from ..files import TOKENIZER_FILES, atomic_directory, save_sharded
from ..lm_config import LMConfig
from ..model import load_student
from ..version import __version__
from .granite import ARCHITECTURE, MODEL_TYPE, export_blockers, granite_config, granite_state_dict

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
STOCK_TRANSFORMERS_MIN = "5.23.0"
"""The first transformers release whose GraniteMoeHybrid normalises the gated output per group."""


class ExportError(CheckpointError):
    """The student cannot be exported (the message lists why); nothing was written."""

    default_hint = "seed an exportable student (docs/export.md lists what exports)"


def check_exportable(config: LMConfig, what: str) -> None:
    """Raise :class:`ExportError` listing every reason ``what`` cannot be exported."""
    reasons = export_blockers(config)
    if reasons:
        raise ExportError(f"{what} cannot be exported to {ARCHITECTURE}: " + "; ".join(reasons))


def check_stock_transformers() -> None:
    """Raise :class:`ExportError` when the installed transformers runs the export wrongly."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(STOCK_TRANSFORMERS_MIN):
        raise ExportError(
            f"transformers {transformers.__version__} normalises GraniteMoeHybrid's Mamba-2 "
            "output over the whole width, not per group as the export needs: it would load the "
            f"export and compute wrong logits (fixed in {STOCK_TRANSFORMERS_MIN})",
            hint=f"pip install -U 'transformers>={STOCK_TRANSFORMERS_MIN}' (vLLM and SGLang are "
            "not affected)",
        )


def _is_export(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE and "mmdistill" in config


def _model_card(config: LMConfig, provenance: dict) -> str:
    kinds = config.layer_types
    attention = [i for i, t in enumerate(kinds) if t == "attention"]
    layout = f"{len(attention)} attention (layers {attention}) + {kinds.count('mamba')} Mamba-2"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [mmdistill, mamba2, hybrid, distillation]
---
# {provenance["student"]}

A linear-time student distilled by mmdistill {__version__} from
`{provenance["teacher"]}` ({provenance["teacher_architecture"]}): {layout} layers,
written as `{ARCHITECTURE}` (dense: no experts, multipliers 1) so stock transformers, vLLM and
SGLang load it without remote code.

With stock transformers {STOCK_TRANSFORMERS_MIN} or newer (earlier releases normalise the Mamba-2
output over the whole width instead of per group, and compute wrong logits without an error):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")
```

Serve: `vllm serve PATH --mamba-ssm-cache-dtype float32` (the SSM state in float32, as trained)
or `python -m sglang.launch_server --model-path PATH`.
"""


def export_student(
    student_dir: str | Path, out: str | Path, force: bool = False, dtype: str | None = None
) -> dict:
    """Write ``student_dir`` as a ``GraniteMoeHybridForCausalLM`` folder ``out``.

    Args:
        student_dir: A saved student.
        out: The export folder (must be empty or missing unless ``force``, and then hold only
            an earlier export).
        force: Replace an earlier export in ``out``.
        dtype: Weights dtype (default: the student's).

    Returns:
        ``{"out", "student", "architecture", "dtype", "layer_types", "files"}``.

    Raises:
        ExportError: the student has something the target cannot express (nothing written).
        CheckpointError: ``out`` is not empty (without ``force``) or holds other files.
    """
    student_dir, out = Path(student_dir), Path(out)
    config = read_student_config(student_dir)
    check_exportable(config, f"the student {student_dir}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a folder")
    if force:
        check_replaceable(out, "export", owned=_is_export, extra_names=("README.md",))
    model = load_student(student_dir, dtype=dtype)
    state = granite_state_dict(config, model.state_dict())
    kwargs = granite_config(config)
    if "attention" not in config.layer_types:
        kwargs["use_cache"] = False  # transformers 5.24 cannot run a pure-Mamba cache (above)
    weights_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    provenance = {
        "version": __version__,
        "student": student_dir.name,
        "teacher": config.teacher.get("source", "unknown"),
        "teacher_architecture": config.teacher.get("architecture", "unknown"),
    }
    document = {**kwargs, "model_type": MODEL_TYPE, "dtype": weights_dtype}
    document["mmdistill"] = provenance
    with atomic_directory(out, overwrite=force) as tmp:
        save_sharded(state, tmp)
        (tmp / "config.json").write_text(json.dumps(document, indent=2))
        special = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = {k: kwargs[k] for k in special if kwargs[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for name in TOKENIZER_FILES:
            if (student_dir / name).is_file():
                shutil.copy2(student_dir / name, tmp / name)
        (tmp / "README.md").write_text(_model_card(config, provenance))
    return {
        "out": str(out),
        "student": str(student_dir),
        "architecture": ARCHITECTURE,
        "dtype": weights_dtype,
        "layer_types": config.layer_types,
        "files": sorted(p.name for p in out.iterdir()),
    }


def load_export(out: str | Path, dtype: torch.dtype = torch.float32):
    """The export in ``out`` loaded by stock transformers (``AutoModelForCausalLM``); raises
    :class:`ExportError` on a transformers release that would compute it wrongly."""
    from transformers import AutoModelForCausalLM

    check_stock_transformers()
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()
