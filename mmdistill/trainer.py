"""The distillation trainer: teacher → seeded student → the recipe's stages → student checkpoint.

:func:`distill` runs a validated :class:`~mmdistill.recipe.Recipe` end to end:

1. checks the recipe's files and the output directory (before the teacher is loaded);
2. loads the teacher (frozen) and seeds the student (float32 master weights), or restores the
   student from the latest complete checkpoint with ``resume=True``;
3. runs each stage in order, each starting from the previous stage's weights: trainable groups
   and losses per :mod:`mmdistill.stages`, AdamW, a warmup-stable-decay / cosine / constant
   schedule, gradient accumulation, clipping, optional gradient checkpointing and bf16;
4. writes the student with :func:`~mmdistill.checkpoint.save_pretrained` to
   ``output_dir/student`` and returns a report (one entry per stage).

Processes. Under ``accelerate launch`` every process runs this code; plain PyTorch uses DDP and
``distributed.deepspeed`` a DeepSpeed engine per stage built from the recipe's ZeRO JSON (its
``"auto"`` fields filled from the stage). The frozen teacher gets no optimiser: with ZeRO-1/2 it
is wrapped with ZeRO stage 0 (replicated), with ZeRO-3 sharded like the student (TRL's
``prepare_deepspeed`` pattern); its layers return their captures (ZeRO-3's module hooks rebuild
call arguments, so nothing is collected through them). The mixers are *not* ZeRO-3 leaf modules: their forward
reads child weights directly, which ZeRO-3 gathers on access, while with ``set_z3_leaf_modules``
the backward pass failed (DeepSpeed 0.19.8). Between stages the full float32 weights are gathered
and the student is rebuilt, so each stage starts from a plain module.

Checkpoints (GUIDE §6) go to ``output_dir/checkpoints/ckpt-SS-NNNNNNNN-NAME``: written under a
temporary name by all processes, renamed by process 0 after a barrier, then ``latest`` (a text
file naming the directory) is replaced atomically and all but the newest ``checkpoint.keep`` are
deleted. A checkpoint holds the student (``model.safetensors`` + ``config.json``), the optimiser and
scheduler (``optimizer.pt``, or DeepSpeed's files in ``engine/``), every process's RNG, the data
position and the report so far (``trainer_state.json``). One is written every
``checkpoint.every`` steps and at the end of each stage.

A non-finite loss (checked before every backward) or gradient norm (checked before every
optimiser step; with DeepSpeed, after it) stops the run with :class:`~mmdistill.errors.TrainingError`
and writes nothing, so the last good checkpoint stays the latest.

Outputs: ``metrics.jsonl`` (one line per optimiser step), ``tensorboard/``, ``recipe.yaml`` (the
resolved recipe), ``report.json`` and ``student/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import config_document
from .data.loader import make_iterator, shapes_dataset
from .data.text import DataContext
from .errors import CheckpointError, DataError, RecipeError, TrainingError
from .files import read_safetensors, save_sharded
from .model import DecoderLM, build_from_state_dict
from .objective import DistillObjective, TeacherForward
from .recipe import Recipe, StageSpec
from .roles import set_trainable
from .seeding import seed
from .teachers import load_teacher
from .training.schedule import make_optimizer, stage_steps

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


# --------------------------------------------------------------------------------------------
# Reports and checkpoint bookkeeping
# --------------------------------------------------------------------------------------------


@dataclass
class StageReport:
    """What one stage did (an entry of the ``--json`` report's ``stages``)."""

    name: str
    mode: str
    trainable: list[str]
    trainable_parameters: int
    steps: int
    initial_loss: float | None = None
    final_loss: float | None = None
    final_parts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    eval_loss: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)


def checkpoint_name(stage: int, step: int, name: str) -> str:
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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
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


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Distiller:
    """Runs a recipe (see the module docstring); most users call :func:`distill`.

    Args:
        recipe: a validated recipe.
        resume: continue from the latest complete checkpoint in ``output_dir``.
        callbacks: called after every optimiser step (and its checkpoint, if any) with that
            step's metrics record, in every process.
        console: rich console for progress (default: stderr).
    """

    def __init__(
        self,
        recipe: Recipe,
        resume: bool = False,
        callbacks: list[Callable[[dict], None]] | None = None,
        console=None,
    ):
        self.recipe = recipe
        self.resume = resume
        self.callbacks = list(callbacks or [])
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        self.out = Path(recipe.output_dir)
        self.ckpt_root = self.out / CHECKPOINTS
        self.global_step = 0
        self.last_checkpoint: Path | None = None
        self.history: list[dict] = []
        self.deepspeed = recipe.distributed.deepspeed is not None
        self.zero_stage = 0
        self.tb = None

    # ---------------------------------------------------------------- setup

    def _preflight(self) -> Path | None:
        """Everything that can fail before the teacher is loaded."""
        problems = self.recipe.missing_files()
        if problems:
            raise DataError("; ".join(problems))
        if self.deepspeed:
            try:
                import deepspeed  # noqa: F401
            except ImportError as exc:
                raise RecipeError(
                    "distributed.deepspeed is set but deepspeed is not installed "
                    f"(pip install deepspeed): {exc}"
                ) from exc
            config = json.loads(Path(self.recipe.distributed.deepspeed).read_text())
            self.zero_stage = int((config.get("zero_optimization") or {}).get("stage", 0))
        if self.resume:
            path = latest_checkpoint(self.ckpt_root)
            if path is None:
                raise CheckpointError(
                    f"--resume: no complete checkpoint in {self.ckpt_root} (a run writes one every "
                    "checkpoint.every steps and at the end of each stage)"
                )
            return path
        if list_checkpoints(self.ckpt_root) or (self.out / "student").exists():
            raise CheckpointError(
                f"{self.out} already holds a run; pass --resume to continue it, or set another "
                "output_dir"
            )
        return None

    def _setup_processes(self) -> None:
        from accelerate import Accelerator

        self.accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.bf16 = self.recipe.precision == "bf16"

    def _barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def _autocast(self):
        enabled = self.bf16 and not self.deepspeed
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _log(self, message: str) -> None:
        if self.is_main:
            self.console.print(message, highlight=False, soft_wrap=True)

    def _load_models(self) -> tuple[DecoderLM, DecoderLM]:
        recipe = self.recipe
        teacher = load_teacher(recipe.teacher, dtype=recipe.resolved_teacher_dtype)
        student = seed(
            teacher,
            attention_layers=recipe.student.attention_layers,
            mixer=recipe.student.mixer,
            seed=recipe.student.seed,
        )
        return teacher.to(self.device), student.float().to(self.device)

    def _data_context(self, teacher: DecoderLM):
        data = self.recipe.data
        ctx = DataContext(
            teacher.config,
            teacher.config.teacher.get("directory"),
            data.system_message,
            data.on_bad_image,
        )
        shapes = None
        if any(s.is_builtin for s in [*data.train, *data.eval]):
            with self.accelerator.main_process_first():
                shapes = shapes_dataset(data.shapes, data.cache_dir)
        return ctx, shapes

    def _init_deepspeed(self) -> None:
        """Let DeepSpeed use the process group accelerate made, or make a one-process group."""
        import deepspeed

        if not dist.is_initialized():
            import socket

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
        deepspeed.init_distributed(auto_mpi_discovery=False)

    def _wrap_teacher(self, teacher: DecoderLM):
        runner = TeacherForward(teacher)
        if not self.deepspeed:
            return runner
        import deepspeed

        self._init_deepspeed()

        config = self._ds_config(self.recipe.stages[0], teacher)
        config.pop("gradient_clipping", None)
        if self.zero_stage != 3:
            config["zero_optimization"] = {"stage": 0}
        engine, *_ = deepspeed.initialize(model=runner, config=config)
        engine.eval()
        return engine

    def _ds_config(self, stage: StageSpec, model: DecoderLM) -> dict:
        """The recipe's DeepSpeed JSON with its ``"auto"`` fields filled for ``stage``."""
        config = json.loads(Path(self.recipe.distributed.deepspeed).read_text())
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        config["train_micro_batch_size_per_gpu"] = stage.batch_size
        config["gradient_accumulation_steps"] = stage.grad_accum
        config["train_batch_size"] = stage.batch_size * stage.grad_accum * self.world
        config["gradient_clipping"] = stage.clip_grad or 0.0
        config["bf16"] = {"enabled": self.bf16}
        config["fp16"] = {"enabled": False}
        config.setdefault("steps_per_print", 1 << 30)
        zero = dict(config.get("zero_optimization") or {})
        hidden = model.config.hidden_size
        defaults = {
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
        }
        for key, value in list(zero.items()):
            if value == "auto":
                if key in defaults:
                    zero[key] = defaults[key]
                else:
                    zero.pop(key)
        config["zero_optimization"] = zero
        return {k: v for k, v in config.items() if v != "auto"}

    # ---------------------------------------------------------------- checkpoints

    def _save_checkpoint(
        self,
        stage_index: int,
        step: int,
        stage_done: bool,
        weights: dict[str, torch.Tensor] | None,
        student: DecoderLM,
        optimizer=None,
        scheduler=None,
        engine=None,
        data_state: dict | None = None,
        current: dict | None = None,
    ) -> Path:
        """Write a complete checkpoint atomically and point ``latest`` at it (all processes)."""
        name = checkpoint_name(stage_index, step, self.recipe.stages[stage_index].name)
        final = self.ckpt_root / name
        tmp = self.ckpt_root / f".tmp-{name}"
        if self.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self._barrier()
        if engine is not None:
            engine.save_checkpoint(str(tmp / "engine"), tag="state", save_latest=False)
        torch.save(_rng_state(), tmp / f"rng-{self.rank}.pt")
        if self.is_main:
            state = weights if weights is not None else student.state_dict()
            save_sharded({k: v.detach().float().cpu() for k, v in state.items()}, tmp)
            (tmp / "config.json").write_text(json.dumps(config_document(student), indent=2))
            if optimizer is not None and engine is None:
                torch.save(
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                    tmp / "optimizer.pt",
                )
            trainer_state = {
                "stage": stage_index,
                "step": step,
                "stage_done": stage_done,
                "stages": [s.name for s in self.recipe.stages],
                "global_step": self.global_step,
                "world": self.world,
                "deepspeed": self.deepspeed,
                "data": data_state,
                "current": current,
                "history": self.history,
            }
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        self._barrier()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _write_text_atomic(self.ckpt_root / LATEST, name + "\n")
            for old in list_checkpoints(self.ckpt_root)[: -self.recipe.checkpoint.keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        self.last_checkpoint = final
        return final

    def _trim_metrics(self, stage_index: int, step: int) -> None:
        """Drop metric lines written after the checkpoint being resumed."""
        path = self.out / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (record["stage_index"], record["step"]) <= (stage_index, step):
                keep.append(line)
        _write_text_atomic(path, "".join(line + "\n" for line in keep))

    # ---------------------------------------------------------------- metrics

    def _record(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record["stage"]
            for key in ("loss", "mse", "kl", "ce", "lr", "grad_norm", "tokens_per_s"):
                if record.get(key) is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", record[key], record["global_step"])

    def _open_tensorboard(self) -> None:
        if not (self.is_main and self.recipe.logging.tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._log("[yellow]tensorboard is not installed; writing metrics.jsonl only[/]")
            return
        self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def _mean_over_processes(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def _sum_over_processes(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def _all_finite(self, value: torch.Tensor | float) -> bool:
        value = torch.as_tensor(value, dtype=torch.float32)
        bad = torch.tensor([0.0 if bool(torch.isfinite(value)) else 1.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def _stop(self, stage: StageSpec, step: int, what: str, value) -> TrainingError:
        kept = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint is not None
            else "no checkpoint had been written yet"
        )
        return TrainingError(
            f"stage '{stage.name}' step {step}: the {what} is not finite ({value}); stopped "
            f"before updating the weights; {kept}. Lower the learning rate, enable clip_grad, "
            "or check the data, then rerun (with --resume to continue from that checkpoint)"
        )

    # ---------------------------------------------------------------- stages

    def _stage_iterator(self, stage: StageSpec, ctx, shapes, specs, seed):
        data = self.recipe.data
        return make_iterator(
            specs,
            ctx,
            shapes,
            data.seq_len,
            data.packing,
            seed,
            stage.batch_size,
            self.rank,
            self.world,
        )

    def _micro_step(self, model, teacher, batch, layers, logits):
        pairs, teacher_logits = teacher(
            batch.input_ids, batch.attention_mask, batch.pixel_values, layers, logits
        )
        with self._autocast():
            return model(
                batch.input_ids, batch.attention_mask, batch.pixel_values, pairs, teacher_logits
            )

    @torch.no_grad()
    def _evaluate(self, model, teacher, stage, ctx, shapes, layers, logits):
        """Mean loss over ``data.eval_batches`` held-out batches (same order every stage)."""
        data = self.recipe.data
        iterator = self._stage_iterator(stage, ctx, shapes, data.eval, (data.seed, 1 << 20))
        total = 0.0
        for _ in range(data.eval_batches):
            batch = next(iterator).to(self.device)
            total += float(self._micro_step(model, teacher, batch, layers, logits)["loss"])
        return self._mean_over_processes([total / data.eval_batches])[0]

    def _gather_weights(self, student: DecoderLM, frozen: dict[str, torch.Tensor]) -> dict:
        """Full float32 weights on the CPU after a DeepSpeed stage (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in student.named_parameters():
            if param.requires_grad:
                out[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
            else:
                out[name] = frozen[name]
        return out

    def _run_stage(
        self,
        stage_index: int,
        student: DecoderLM,
        teacher,
        ctx,
        shapes,
        resume_state: dict | None,
        resume_dir: Path | None,
    ) -> tuple[DecoderLM, dict]:
        recipe = self.recipe
        stage = recipe.stages[stage_index]
        data = recipe.data
        counts = set_trainable(student, stage.trainable)
        trainable = sum(counts.values())
        if trainable == 0:
            raise RecipeError(
                f"stages.{stage_index}.trainable: {stage.trainable} match no parameter of this "
                "student"
            )
        for role, n in counts.items():
            if n == 0:
                self._log(f"[yellow]stage {stage.name}: role '{role}' matches no parameter[/]")
        total = stage_steps(stage, self.world, data.seq_len)
        layerwise = stage.loss.layerwise
        layers = student.mixer_layers() if stage.loss.mse_weight > 0 else []
        if layerwise and not layers:
            raise RecipeError(
                f"stages.{stage_index}: a layer-wise stage needs converted layers, but the "
                "student keeps attention everywhere (student.attention_layers)"
            )
        student.gradient_checkpointing = recipe.gradient_checkpointing
        student.train()
        objective = DistillObjective(
            student,
            stage.loss,
            checkpoint_mixers=recipe.gradient_checkpointing,
            vision_dummy=self.world > 1 and "vision" in stage.trainable,
        )
        params = [p for p in student.parameters() if p.requires_grad]
        fused = self.device.type == "cuda" and not self.deepspeed
        optimizer, scheduler = make_optimizer(student, stage, total, fused)
        engine = None
        frozen: dict[str, torch.Tensor] = {}
        if self.deepspeed:
            import deepspeed

            frozen = {
                n: p.detach().float().cpu().clone()
                for n, p in student.named_parameters()
                if not p.requires_grad
            }
            engine, optimizer, _, scheduler = deepspeed.initialize(
                model=objective,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=self._ds_config(stage, student),
            )
            model = engine
        elif self.world > 1:
            model = self.accelerator.prepare_model(objective)
        else:
            model = objective
        iterator = self._stage_iterator(stage, ctx, shapes, data.train, (data.seed, stage_index))
        report = StageReport(
            name=stage.name,
            mode="layerwise" if layerwise else "end_to_end",
            trainable=list(stage.trainable),
            trainable_parameters=trainable,
            steps=total,
        )
        start = 0
        if resume_state is not None:
            start = resume_state["step"]
            current = resume_state["current"]
            report.initial_loss = current["initial_loss"]
            report.final_loss = current["final_loss"]
            report.tokens = current["tokens"]
            report.seconds = current["seconds"]
            iterator.load_state_dict(resume_state["data"])
            if engine is not None:
                engine.load_checkpoint(
                    str(resume_dir / "engine"),
                    tag="state",
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                )
            else:
                saved = torch.load(resume_dir / "optimizer.pt", weights_only=True)
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            _set_rng_state(torch.load(resume_dir / f"rng-{self.rank}.pt", weights_only=True))
        progress = self._progress(stage, total, start)
        began = time.perf_counter() - report.seconds
        try:
            for step in range(start, total):
                record = self._train_step(
                    stage_index,
                    stage,
                    step,
                    total,
                    model,
                    engine,
                    optimizer,
                    scheduler,
                    params,
                    teacher,
                    iterator,
                    layers,
                    not layerwise,
                )
                report.tokens += record["step_tokens"]
                if report.initial_loss is None:
                    report.initial_loss = record["loss"]
                report.final_loss = record["loss"]
                report.final_parts = {k: record[k] for k in ("mse", "kl", "ce") if k in record}
                report.seconds = time.perf_counter() - began
                record["tokens"] = report.tokens
                record["elapsed"] = round(report.seconds, 3)
                self._record(record)
                self._show(progress, stage, record, total, report)
                every = recipe.checkpoint.every
                if every and (step + 1) % every == 0 and step + 1 < total:
                    weights = self._gather_weights(student, frozen) if engine is not None else None
                    self._save_checkpoint(
                        stage_index,
                        step + 1,
                        False,
                        weights,
                        student,
                        optimizer,
                        scheduler,
                        engine,
                        iterator.state_dict(),
                        self._current(report),
                    )
                for callback in self.callbacks:
                    callback(record)
        finally:
            if progress is not None:
                progress.stop()
        if data.eval:
            if engine is not None:
                engine.eval()
            else:
                student.eval()
            report.eval_loss = self._evaluate(
                model, teacher, stage, ctx, shapes, layers, not layerwise
            )
        report.skipped = iterator.skipped()
        report.seconds = time.perf_counter() - began
        report.tokens_per_second = report.tokens / max(report.seconds, 1e-9)
        if engine is not None:
            weights = self._gather_weights(student, frozen)
            del model, engine, optimizer, objective
            student = build_from_state_dict(student.config, weights, torch.float32).to(self.device)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        student.eval()
        student.requires_grad_(False)
        return student, asdict(report)

    def _current(self, report: StageReport) -> dict:
        return {
            "initial_loss": report.initial_loss,
            "final_loss": report.final_loss,
            "tokens": report.tokens,
            "seconds": report.seconds,
        }

    def _train_step(
        self,
        stage_index,
        stage,
        step,
        total,
        model,
        engine,
        optimizer,
        scheduler,
        params,
        teacher,
        iterator,
        layers,
        logits,
    ) -> dict:
        """One optimiser step (``grad_accum`` micro-batches); returns its metrics record."""
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(stage.grad_accum):
            batch = next(iterator).to(self.device)
            tokens += batch.tokens
            out = self._micro_step(model, teacher, batch, layers, logits)
            loss = out["loss"]
            if not self._all_finite(loss.detach()):
                raise self._stop(stage, step + 1, "loss", float(loss.detach()))
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                last = micro == stage.grad_accum - 1
                sync = model.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
                with sync:
                    (loss / stage.grad_accum).backward()
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        if engine is not None:
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
            if grad_norm is not None and not self._all_finite(grad_norm):
                raise self._stop(stage, step + 1, "gradient norm", grad_norm)
        else:
            limit = stage.clip_grad if stage.clip_grad else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            if not self._all_finite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise self._stop(stage, step + 1, "gradient norm", grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        keys = sorted(sums)
        means = self._mean_over_processes([sums[k] / stage.grad_accum for k in keys])
        step_tokens = self._sum_over_processes(tokens)
        seconds = time.perf_counter() - started
        self.global_step += 1
        record = {
            "stage": stage.name,
            "stage_index": stage_index,
            "step": step + 1,
            "steps": total,
            "global_step": self.global_step,
            **{k: round(v, 8) for k, v in zip(keys, means, strict=True)},
            "lr": lr,
            "grad_norm": grad_norm,
            "step_tokens": step_tokens,
            "tokens_per_s": round(step_tokens / max(seconds, 1e-9), 1),
        }
        return record

    # ---------------------------------------------------------------- progress

    def _progress(self, stage: StageSpec, total: int, start: int):
        if not (self.is_main and self.recipe.logging.progress and self.console.is_terminal):
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        progress.start()
        self._task = progress.add_task(stage.name, total=total, completed=start, loss="-", tps="-")
        return progress

    def _show(self, progress, stage: StageSpec, record: dict, total: int, report) -> None:
        if not self.is_main:
            return
        if progress is not None:
            progress.update(
                self._task,
                completed=record["step"],
                loss=f"{record['loss']:.4g}",
                tps=f"{record['tokens_per_s']:,.0f}",
            )
            return
        step = record["step"]
        if step == 1 or step == total or step % self.recipe.logging.every == 0:
            rate = report.tokens / max(report.seconds, 1e-9)
            eta = (total - step) * report.seconds / max(step, 1)
            self._log(
                f"{stage.name} step {step}/{total} loss {record['loss']:.5g} "
                f"{rate:,.0f} tok/s ETA {eta:.0f}s"
            )

    # ---------------------------------------------------------------- run

    def run(self) -> dict:
        """Run every remaining stage and write the student; returns the report."""
        recipe = self.recipe
        resume_dir = self._preflight()
        self._setup_processes()
        torch.manual_seed(recipe.seed)
        started = time.perf_counter()
        state = None
        if resume_dir is not None:
            state = json.loads((resume_dir / STATE_FILE).read_text())
            names = [s.name for s in recipe.stages]
            upto = state["stage"] + 1
            if state["stages"][:upto] != names[:upto]:
                raise CheckpointError(
                    f"{resume_dir} was written by a recipe with stages {state['stages']}; this "
                    f"recipe has {names}"
                )
            if state["deepspeed"] != self.deepspeed or (
                self.deepspeed and not state["stage_done"] and state["world"] != self.world
            ):
                raise CheckpointError(
                    f"{resume_dir} was written with deepspeed={state['deepspeed']} on "
                    f"{state['world']} processes; resume it the same way"
                )
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.ckpt_root.glob(".tmp-*") if self.ckpt_root.exists() else []:
                shutil.rmtree(stale, ignore_errors=True)
            (self.out / "recipe.yaml").write_text(recipe.to_yaml())
        with (
            self.console.status("loading the teacher") if self.is_main else contextlib.nullcontext()
        ):
            teacher, student = self._load_models()
        ctx, shapes = self._data_context(teacher)
        first_stage = 0
        stage_state = None
        if state is not None:
            student.load_state_dict(
                {k: v.to(self.device) for k, v in read_safetensors(resume_dir).items()}
            )
            self.history = state["history"]
            self.global_step = state["global_step"]
            self.last_checkpoint = resume_dir
            first_stage = state["stage"] + (1 if state["stage_done"] else 0)
            if not state["stage_done"]:
                stage_state = state
            self._trim_metrics(state["stage"], state["step"])
            self._log(f"resuming from {resume_dir}")
        self._open_tensorboard()
        runner = self._wrap_teacher(teacher)
        try:
            for k in range(first_stage, len(recipe.stages)):
                student, report = self._run_stage(
                    k, student, runner, ctx, shapes, stage_state, resume_dir
                )
                stage_state = None
                self.history.append(report)
                self._save_checkpoint(k, report["steps"], True, None, student)
                self._log(
                    f"stage {report['name']}: loss {report['initial_loss']:.5g} -> "
                    f"{report['final_loss']:.5g} in {report['steps']} steps, "
                    f"{report['tokens']:,} tokens, {report['seconds']:.1f} s"
                )
        finally:
            if self.tb is not None:
                self.tb.close()
        student_dir = self.out / "student"
        if self.is_main:
            student.save_pretrained(student_dir, overwrite=True)
        self._barrier()
        result = {
            "student_dir": str(student_dir),
            "output_dir": str(self.out),
            "teacher": recipe.teacher,
            "processes": self.world,
            "deepspeed": recipe.distributed.deepspeed,
            "stages": self.history,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if self.is_main:
            (self.out / "report.json").write_text(json.dumps(result, indent=2))
        return result


def distill(
    recipe: Recipe,
    resume: bool = False,
    callbacks: list[Callable[[dict], None]] | None = None,
    console=None,
) -> dict:
    """Run ``recipe`` (see the module docstring) and return the report.

    Returns:
        ``{"student_dir", "output_dir", "teacher", "processes", "deepspeed", "seconds",
        "stages": [{"name", "mode", "trainable", "trainable_parameters", "initial_loss",
        "final_loss", "final_parts", "steps", "tokens", "seconds", "tokens_per_second",
        "eval_loss", "skipped"}, ...]}``.
    """
    return Distiller(recipe, resume=resume, callbacks=callbacks, console=console).run()
