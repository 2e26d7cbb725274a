"""DeepSpeed: checking it is usable, initialising it, its configuration and its engines.

The recipe names a ZeRO JSON; each stage fills its ``"auto"`` fields and gets its own engine
around the student's objective (optimiser and scheduler come from the recipe). The frozen teacher
gets an engine without an optimiser: with ZeRO-1/2 at ZeRO stage 0 (replicated), with ZeRO-3
sharded like the student (TRL's ``prepare_deepspeed`` pattern). The mixers are *not* ZeRO-3 leaf
modules: their forward reads child weights directly, which ZeRO-3 gathers on access, while with
``set_z3_leaf_modules`` the backward pass failed (DeepSpeed 0.19.8). ``deepspeed`` is imported
only here and only when a recipe uses it.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from pathlib import Path

import torch

from ..errors import RecipeError
from ..model import DecoderLM
from ..objective import DistillObjective, TeacherForward
from ..recipe import Recipe, StageSpec


def zero_stage(recipe: Recipe) -> int | None:
    """The ZeRO stage of the recipe's DeepSpeed JSON, or ``None`` when it uses no DeepSpeed.

    Raises:
        RecipeError: ``distributed.deepspeed`` is set but DeepSpeed is not installed.
    """
    if recipe.distributed.deepspeed is None:
        return None
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise RecipeError(
            "distributed.deepspeed is set but deepspeed is not installed "
            f"(pip install deepspeed): {exc}"
        ) from exc
    config = json.loads(Path(recipe.distributed.deepspeed).read_text())
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def init_deepspeed(device: torch.device) -> None:
    """Initialise DeepSpeed on the process group accelerate made, or on a one-process group.

    On the CPU, DeepSpeed's communication backend would JIT-compile a C++ shared-memory
    all-reduce (``deepspeed_shm_comm``, through ninja; about 85 s on two cores) that only its
    ``inference_all_reduce`` uses; training collectives go through gloo either way, so the build
    is skipped and nothing is compiled. (The attribute ``deepspeed.comm.torch`` is PyTorch itself,
    hence the module lookup.)
    """
    import deepspeed

    if not torch.distributed.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in (
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(port)),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
        ):
            os.environ.setdefault(key, value)
    if device.type == "cpu":
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(auto_mpi_discovery=False)


def deepspeed_config(recipe: Recipe, stage: StageSpec, hidden_size: int, world: int) -> dict:
    """The recipe's DeepSpeed JSON with its ``"auto"`` fields filled for ``stage``.

    Args:
        recipe: The recipe (its ZeRO JSON and precision).
        stage: Batch size, gradient accumulation and clipping.
        hidden_size: The model's hidden size (sizes ZeRO's buckets).
        world: Number of processes.
    """
    config = json.loads(Path(recipe.distributed.deepspeed).read_text())
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["train_micro_batch_size_per_gpu"] = stage.batch_size
    config["gradient_accumulation_steps"] = stage.grad_accum
    config["train_batch_size"] = stage.batch_size * stage.grad_accum * world
    config["gradient_clipping"] = stage.clip_grad or 0.0
    config["bf16"] = {"enabled": recipe.precision == "bf16"}
    config["fp16"] = {"enabled": False}
    config.setdefault("steps_per_print", 1 << 30)
    zero = dict(config.get("zero_optimization") or {})
    defaults = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in list(zero.items()):
        if value == "auto":
            if key in defaults:
                zero[key] = defaults[key]
            else:
                zero.pop(key)
    config["zero_optimization"] = zero
    return {k: v for k, v in config.items() if v != "auto"}


def wrap_teacher(runner: TeacherForward, recipe: Recipe, zero: int, world: int):
    """An engine around the frozen teacher's forward, without an optimiser.

    Args:
        runner: The teacher's forward.
        recipe: The recipe (the first stage's batch settings are used).
        zero: The recipe's ZeRO stage: 3 shards the teacher, anything else replicates it.
        world: Number of processes.

    Returns:
        The engine, in eval mode.
    """
    import deepspeed

    init_deepspeed(runner.model.device)
    config = deepspeed_config(recipe, recipe.stages[0], runner.model.config.hidden_size, world)
    config.pop("gradient_clipping", None)
    if zero != 3:
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=runner, config=config)
    engine.eval()
    return engine


def wrap_student(objective: DistillObjective, optimizer, scheduler, config: dict) -> tuple:
    """A training engine around the student's objective.

    Returns:
        ``(engine, optimizer, scheduler)``, the last two as DeepSpeed wraps them.
    """
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine, optimizer, scheduler


def frozen_weights(student: DecoderLM) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the parameters that do not train (kept outside the engine)."""
    return {
        n: p.detach().float().cpu().clone()
        for n, p in student.named_parameters()
        if not p.requires_grad
    }


def gather_weights(student: DecoderLM, frozen: dict[str, torch.Tensor]) -> dict:
    """Full float32 weights on the CPU during or after a DeepSpeed stage (collective).

    Args:
        student: The student inside the engine.
        frozen: :func:`frozen_weights`, taken before the engine was built.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in student.named_parameters():
        if param.requires_grad:
            out[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
        else:
            out[name] = frozen[name]
    return out
