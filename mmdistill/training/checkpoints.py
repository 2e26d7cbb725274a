"""Training checkpoints: their names, listing them, the ``latest`` marker, RNG states, and
writing a complete checkpoint atomically.

Checkpoints go to ``output_dir/checkpoints/ckpt-SS-NNNNNNNN-NAME`` (stage index, completed steps,
stage name). Every process writes into process 0's temporary directory
(:func:`mmdistill.files.atomic_directory`), which process 0 renames after a barrier; then
``latest`` (a text file naming the directory) is replaced atomically and all but the newest
``checkpoint.keep`` are deleted. A checkpoint holds the student (``model.safetensors`` +
``config.json``), the optimiser and scheduler (``optimizer.pt``, or DeepSpeed's files in
``engine/``), every process's RNG (``rng-R.pt``), and ``trainer_state.json``: the stage, step,
data position and the report so far.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import config_document, state_to_save
from ..files import atomic_directory, atomic_write_text, save_sharded
from ..model import DecoderLM
from .deepspeed_engine import gather_weights
from .processes import Processes
from .state import Run, Stage

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


def checkpoint_name(stage: int, step: int, name: str) -> str:
    """``ckpt-SS-NNNNNNNN-NAME`` for step ``step`` of stage ``stage`` (named ``name``)."""
    return f"ckpt-{stage:02d}-{step:08d}-{name}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        parts = path.name.split("-", 3)
        if (
            path.is_dir()
            and len(parts) == 4
            and parts[0] == "ckpt"
            and (path / STATE_FILE).exists()
        ):
            found.append(((int(parts[1]), int(parts[2])), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint the ``latest`` marker names, if it is complete."""
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def remove_partial_checkpoints(root: Path) -> None:
    """Delete temporary checkpoint directories an interrupted run left under ``root``."""
    for stale in root.glob(".ckpt-*") if root.exists() else []:
        shutil.rmtree(stale, ignore_errors=True)


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore this process's RNG states from :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run: Run,
    index: int,
    step: int,
    student: DecoderLM,
    stage: Stage | None = None,
    finished: dict | None = None,
) -> Path:
    """Write a complete checkpoint atomically and point ``latest`` at it (all processes).

    Args:
        run: The run.
        index: The stage's index.
        step: Steps of the stage done.
        student: The student (the plain module, also under DeepSpeed).
        stage: The stage in progress, for a mid-stage checkpoint (optimiser, data position,
            report so far); ``None`` at the end of a stage.
        finished: At the end of a stage, its report: recorded with the finished stages once
            the checkpoint is complete (``run.history``).

    Returns:
        The checkpoint directory.
    """
    procs = run.procs
    root = run.out / CHECKPOINTS
    name = checkpoint_name(index, step, run.recipe.stages[index].name)
    engine = stage.engine if stage is not None else None
    weights = gather_weights(student, stage.frozen) if engine is not None else None
    with _shared_directory(procs, root / name) as tmp:
        if engine is not None:
            engine.save_checkpoint(str(tmp / "engine"), tag="state", save_latest=False)
        torch.save(rng_state(), tmp / f"rng-{procs.rank}.pt")
        if procs.is_main:
            state = weights if weights is not None else student.state_dict()
            save_sharded(_float32(state_to_save(state, student.config)), tmp)
            (tmp / "config.json").write_text(json.dumps(config_document(student), indent=2))
            if stage is not None and engine is None:
                optimizer = stage.optimizer.state_dict()
                scheduler = stage.scheduler.state_dict()
                torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / "optimizer.pt")
            trainer_state = _trainer_state(run, index, step, stage, finished)
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    if procs.is_main:
        atomic_write_text(root / LATEST, name + "\n")
        for old in list_checkpoints(root)[: -run.recipe.checkpoint.keep]:
            if old != root / name:
                shutil.rmtree(old, ignore_errors=True)
    procs.barrier()
    run.last_checkpoint = root / name
    if finished is not None:
        run.history.append(finished)
    return root / name


def _float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in state.items()}


def _trainer_state(
    run: Run, index: int, step: int, stage: Stage | None, finished: dict | None
) -> dict:
    """The contents of ``trainer_state.json``."""
    return {
        "stage": index,
        "step": step,
        "stage_done": stage is None,
        "stages": [s.name for s in run.recipe.stages],
        "global_step": run.global_step,
        "world": run.procs.world,
        "deepspeed": run.deepspeed,
        "data": stage.batches.state_dict() if stage is not None else None,
        "current": stage.report.current() if stage is not None else None,
        "history": [*run.history, *([finished] if finished is not None else [])],
    }


@contextmanager
def _shared_directory(procs: Processes, target: Path) -> Iterator[Path]:
    """Process 0's :func:`~mmdistill.files.atomic_directory` for ``target``, in every process.

    Every process writes into the temporary directory; it replaces ``target`` once all are done.
    """
    if procs.is_main:
        with atomic_directory(target, overwrite=True) as tmp:
            procs.share(str(tmp))
            yield tmp
            procs.barrier()
    else:
        tmp = Path(procs.share(None))
        yield tmp
        procs.barrier()
