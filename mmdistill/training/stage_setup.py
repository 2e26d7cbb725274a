"""Building one stage (trainable groups, objective, optimiser, DeepSpeed engine or DDP, data)
and taking the student back out of it afterwards.

Each stage starts from the previous stage's weights as a plain module. Under DeepSpeed the
stage's engine holds the student; afterwards the full float32 weights are gathered and the
student is rebuilt from them.
"""

from __future__ import annotations

import torch

from ..chat_format import chat_format_for
from ..errors import RecipeError
from ..model import DecoderLM, build_from_state_dict
from ..objective import DistillObjective
from ..omni_objective import OmniObjective
from ..roles import set_trainable
from ..task_lora import LoraSpec, adapter_of_parameter
from .deepspeed_engine import deepspeed_config, frozen_weights, gather_weights, wrap_student
from .omni_data import task_batches
from .schedule import make_optimizer, stage_steps
from .state import Run, Stage, StageReport


def build_stage(run: Run, index: int, student: DecoderLM) -> Stage:
    """Stage ``index`` of the recipe, ready to train ``student``.

    Raises:
        RecipeError: the stage's roles match no parameter, or a layer-wise stage has no
            converted layer.
    """
    recipe, procs = run.recipe, run.procs
    spec = recipe.stages[index]
    trainable = _set_trainable(run, index, student)
    steps = stage_steps(spec, procs.world, recipe.data.seq_len)
    student.gradient_checkpointing = recipe.gradient_checkpointing
    student.train()
    if spec.tasks:
        fmt = chat_format_for(student.config, run.data.tokenizer)
        objective, layers = OmniObjective(student, fmt.answer_header(), fmt.stop_ids), []
        batches = task_batches(run, index, spec, student)
    else:
        objective, layers = _distill_objective(run, index, student)
        batches = run.batches(recipe.data.train, (recipe.data.seed, index), spec.batch_size)
    params = [p for p in student.parameters() if p.requires_grad]
    fused = procs.device.type == "cuda" and not run.deepspeed
    optimizer, scheduler = make_optimizer(student, spec, steps, fused)
    model, engine, frozen = objective, None, {}
    if run.deepspeed:
        frozen = frozen_weights(student)
        config = deepspeed_config(recipe, spec, student.config.hidden_size, procs.world)
        engine, optimizer, scheduler = wrap_student(objective, optimizer, scheduler, config)
        model = engine
    elif procs.world > 1:
        model = procs.accelerator.prepare_model(objective)
    report = StageReport(
        name=spec.name,
        mode=_mode(spec),
        trainable=list(spec.trainable),
        trainable_parameters=trainable,
        steps=steps,
    )
    return Stage(
        index=index,
        spec=spec,
        steps=steps,
        student=student,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        batches=batches,
        layers=layers,
        report=report,
        engine=engine,
        frozen=frozen,
    )


def _distill_objective(run: Run, index: int, student: DecoderLM) -> tuple[DistillObjective, list]:
    """The distillation loss of stage ``index`` and the converted layers it needs.

    Raises:
        RecipeError: a layer-wise stage on a student without converted layers.
    """
    spec = run.recipe.stages[index]
    layers = student.mixer_layers() if spec.loss.mse_weight > 0 else []
    if spec.loss.layerwise and not layers:
        raise RecipeError(
            f"stages.{index}: a layer-wise stage needs converted layers, but the student keeps "
            "attention everywhere (student.attention_layers)"
        )
    objective = DistillObjective(
        student,
        spec.loss,
        checkpoint_mixers=run.recipe.gradient_checkpointing,
        vision_dummy=run.procs.world > 1 and "vision" in spec.trainable,
    )
    return objective, layers


def _mode(spec) -> str:
    if spec.tasks:
        return f"task:{spec.task}"
    return "layerwise" if spec.loss.layerwise else "end_to_end"


def _set_trainable(run: Run, index: int, student: DecoderLM) -> int:
    """Unfreeze the stage's roles (warning about roles that match nothing); the count unfrozen.

    In a task stage the ``lora`` role means the adapters of the stage's own task(s): the other
    task's adapter stays frozen, bit for bit.
    """
    spec = run.recipe.stages[index]
    counts = set_trainable(student, spec.trainable)
    if spec.tasks and student.config.lora is not None:
        lora = LoraSpec.from_dict(student.config.lora)
        own = {lora.adapter_for(task) for task in spec.tasks}
        for name, param in student.named_parameters():
            adapter = adapter_of_parameter(name)
            if adapter is not None and adapter not in own and param.requires_grad:
                param.requires_grad_(False)
                counts["lora"] -= param.numel()
    trainable = sum(counts.values())
    if trainable == 0:
        raise RecipeError(
            f"stages.{index}.trainable: {spec.trainable} match no parameter of this student"
        )
    for role, n in counts.items():
        if n == 0:
            run.log(f"[yellow]stage {spec.name}: role '{role}' matches no parameter[/]")
    return trainable


def finish_stage(run: Run, stage: Stage) -> DecoderLM:
    """The trained student as a plain, frozen module in eval mode (gathered under DeepSpeed)."""
    student = stage.student
    if stage.engine is not None:
        weights = gather_weights(student, stage.frozen)
        stage.model = stage.engine = stage.optimizer = stage.scheduler = None
        student = build_from_state_dict(student.config, weights, torch.float32)
        student = student.to(run.procs.device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    student.eval()
    student.requires_grad_(False)
    return student
