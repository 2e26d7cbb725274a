"""Distillation recipes: YAML parsed into typed, validated pydantic models.

A recipe names the teacher, the student layout, the data, the list of stages (trainable parameter
groups by role, loss, optimiser, schedule, length, batch), precision, distributed settings,
logging, checkpointing and ``output_dir``. Unknown keys and wrong types are refused before any
heavy work, and every error names the full key path (``stages.0.lr: ...``).

Command-line overrides follow OmegaConf's dotlist: ``key=value`` with a dotted path whose integer
parts index lists (``stages.0.lr=1e-3``) and a YAML value (``data.train=[{source: a.txt}]``).

Typical use::

    recipe = load_recipe("recipes/tiny.yaml", ["output_dir=runs/x", "stages.0.steps=10"])
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .attention_layers import auto_budget, is_auto, parse_attention_layers
from .errors import RecipeError
from .gates import Gate, parse_gates
from .mixer import TEACHER_FIELDS, MixerConfig
from .roles import MIXER_ROLES, Role

BUILTIN_DATA = ("builtin:shapes", "builtin:shapes/eval", "builtin:shapes/text")
BUILTIN_CAPTIONS = ("builtin:shapes-t2i", "builtin:shapes-t2i/heldout")
STAGE_TASKS = ("distill", "mmu", "t2i", "both")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class StudentSpec(_Strict):
    """Which layers keep attention and how the Mamba-2 mixers are configured.

    Attributes:
        attention_layers: ``none`` | ``all`` | ``every:K`` | ``auto:K`` | ``auto:P%`` | a comma
            list or a list of indices over the flat decoder stack (see
            :mod:`mmdistill.attention_layers`). ``auto`` trains a linear student through the
            layer-wise stages, then keeps the layers that close most of the gap to the teacher
            (:mod:`mmdistill.layer_scores`), restored from the teacher, for the other stages.
        layout_batches: calibration batches (the first stage's batch size, ``data.eval``'s
            sources, else ``data.train``'s) on which ``auto`` scores the layers.
        layout_search: how ``auto`` picks from the scores: ``top`` (the K layers of largest
            gain, one scoring round) or ``greedy`` (one layer at a time, each round scored with
            the layers already picked restored: K rounds).
        layout_before: the stage before which ``auto`` scores and picks (its name); ``None``:
            the first stage that is not layer-wise. Naming a later stage lets the linear
            student train end to end first (a short stage of its own) and be scored after it.
        mixer: :class:`~mmdistill.mixer.MixerConfig` options (``conv_kernel``, ``gate_order``,
            ``use_D``, ``backend``, ``chunk_size``, ...); sizes come from the teacher.
        seed: RNG seed of the new SSM parameters.
    """

    attention_layers: str | list[int] = "none"
    mixer: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    layout_batches: int = Field(8, ge=1)
    layout_search: Literal["top", "greedy"] = "top"
    layout_before: str | None = None

    @field_validator("attention_layers", mode="before")
    @classmethod
    def _not_a_bare_number(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(
                f"{value} is ambiguous: write [{value}] to keep attention in layer {value}, or "
                f"every:{value} for every {value}th layer"
            )
        return value

    @field_validator("attention_layers")
    @classmethod
    def _layout(cls, value):
        # Syntax only (the layer count comes with the teacher); every:K is checked on one layer
        # so that no range of 2**30 indices is built.
        every = isinstance(value, str) and value.strip().lower().startswith("every:")
        if is_auto(value):
            auto_budget(value, 1 << 30)
        else:
            parse_attention_layers(value, 1 if every else 1 << 30)
        return value

    @field_validator("mixer")
    @classmethod
    def _mixer(cls, value):
        fixed = sorted(set(value) & set(TEACHER_FIELDS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} come(s) from the teacher and cannot be set")
        unknown = sorted(set(value) - set(MixerConfig.__dataclass_fields__))
        if unknown:
            known = sorted(set(MixerConfig.__dataclass_fields__) - {"hidden_size", "num_heads"})
            raise ValueError(f"unknown mixer option(s) {unknown}; known: {known}")
        try:
            MixerConfig(hidden_size=8, num_heads=1, num_kv_heads=1, head_dim=8, **value)
        except TypeError as exc:
            raise ValueError(f"invalid mixer option: {exc}") from None
        return value


class ShapesSpec(_Strict):
    """Size of the ``builtin:shapes`` data set (:func:`mmdistill.data.synthetic.build_demo_dataset`)."""

    n_train: int = Field(512, ge=1)
    n_eval: int = Field(64, ge=1)
    seed: int = 0
    image_size: int = Field(56, ge=32)
    max_shapes: int = Field(3, ge=1, le=4)
    text_lines: int = Field(2000, ge=1)


class DataSource(_Strict):
    """One training or evaluation source.

    Attributes:
        source: a ``.txt`` file (one document per non-empty line), a JSONL file of
            ``{"text": ...}``, ``{"input_ids": [...]}`` or InternVL/LLaVA conversation records,
            or ``builtin:shapes`` (conversations, train split), ``builtin:shapes/eval`` (held-out
            split) or ``builtin:shapes/text`` (its text corpus).
        weight: relative sampling weight in the mixture.
        image_root: directory image paths are relative to (default: the JSONL's directory).
        max_samples: use only the first N records.
    """

    source: str
    weight: float = Field(1.0, gt=0)
    image_root: str | None = None
    max_samples: int | None = Field(None, ge=1)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str):
        known = (*BUILTIN_DATA, *BUILTIN_CAPTIONS)
        if value.startswith("builtin:") and value not in known:
            raise ValueError(f"unknown built-in data {value!r}; known: {', '.join(known)}")
        if not value.startswith("builtin:") and Path(value).suffix not in (".txt", ".jsonl"):
            raise ValueError(f"{value!r}: data files must end in .txt or .jsonl")
        return value

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")


class DataSpec(_Strict):
    """Training and evaluation data.

    Attributes:
        train: sources mixed by weight (a source is revisited, reshuffled, once exhausted).
        eval: held-out sources, evaluated at the end of each stage.
        seq_len: tokens per sequence.
        packing: pack several samples into each sequence (text may continue into the next
            sequence; a multimodal sample is never split); else one sample per sequence.
        seed: seed of the sampling order (same seed, same batches).
        on_bad_image: ``skip`` a record whose image is missing or unreadable (reported on
            stderr, counted) or ``fail`` the run, naming the path.
        max_skipped_fraction: with ``skip``, stop the run (exit 2) once more than this fraction
            of a file's records read so far (at least 20) were skipped.
        system_message: system message of rendered conversations (``None``: the template's).
        shapes: size of the ``builtin:shapes`` data.
        eval_batches: batches per evaluation.
        cache_dir: where built-in data is generated (default: the mmdistill cache).
    """

    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] = Field(default_factory=list)
    seq_len: int = Field(2048, ge=8)
    packing: bool = True
    seed: int = 0
    on_bad_image: Literal["skip", "fail"] = "skip"
    max_skipped_fraction: float = Field(0.1, ge=0, le=1)
    system_message: str | None = None
    shapes: ShapesSpec = Field(default_factory=ShapesSpec)
    eval_batches: int = Field(8, ge=1)
    cache_dir: str | None = None


class LossSpec(_Strict):
    """Loss of a stage: ``mse_weight * layer MSE + kl_weight * KL + ce_weight * CE``.

    A stage with only the MSE term is *layer-wise*: one teacher forward supplies each converted
    layer's input and target and only the mixers run in the student (stages 1-2). Any KL or CE
    term makes it *end-to-end* (stage 3).

    Attributes:
        mse_weight: weight of the per-layer MSE between mixer and teacher-attention outputs
            (mmMamba: 1000).
        kl_weight: weight of KL(teacher || student) on logits, normalised per token.
        kl_temperature: softmax temperature of both sides (the KL is scaled by T^2).
        ce_weight: weight of the next-token cross-entropy of the student.
    """

    mse_weight: float = Field(0.0, ge=0)
    kl_weight: float = Field(0.0, ge=0)
    kl_temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _some_term(self):
        if not (self.mse_weight or self.kl_weight or self.ce_weight):
            raise ValueError("give at least one positive weight: mse_weight, kl_weight, ce_weight")
        return self

    @property
    def layerwise(self) -> bool:
        return self.kl_weight == 0 and self.ce_weight == 0


class ScheduleSpec(_Strict):
    """Learning-rate schedule of a stage (multiplier of ``lr`` per optimiser step).

    Attributes:
        kind: ``constant``, ``cosine`` (warmup, then cosine to ``min_lr_ratio``) or ``wsd``
            (warmup, stable, then linear decay to ``min_lr_ratio`` over the last steps).
        warmup_steps / warmup_ratio: warmup length as steps or a fraction of the stage.
        decay_steps / decay_ratio: ``wsd`` decay length as steps or a fraction of the stage.
        min_lr_ratio: final multiplier.
    """

    kind: Literal["constant", "cosine", "wsd"] = "wsd"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    decay_steps: int | None = Field(None, ge=0)
    decay_ratio: float = Field(0.1, ge=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TaskRatio(_Strict):
    """Rows of each task per micro-step of a ``both`` stage."""

    mmu: int = Field(ge=0)
    t2i: int = Field(ge=0)

    @model_validator(mode="after")
    def _some_rows(self):
        if self.mmu + self.t2i == 0:
            raise ValueError("task_ratio is 0:0; give at least one task rows (OmniMamba: 3:48)")
        return self


class LoraOptions(_Strict):
    """Task LoRA adapters (:class:`~mmdistill.task_lora.LoraSpec`): OmniMamba's r 8, alpha 32,
    dropout 0.05; ``shared: true`` uses one adapter for both tasks (an ablation)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    shared: bool = False


class OmniSpec(_Strict):
    """What OmniMamba stages (``task`` mmu/t2i/both) add to the student and train on.

    Attributes:
        image_tokenizer: ``builtin:shapes-vq``, a saved image tokenizer directory, or a LlamaGen
            VQ checkpoint file (``.safetensors``/``.pt``) with ``image_tokenizer_config`` sizes.
        image_tokenizer_config: :class:`~mmdistill.image_tokenizer.VQConfig` fields for a
            LlamaGen checkpoint file (default: VQ-16).
        vocabulary: ``decoupled`` (own image embeddings and head) or ``shared`` (one joint
            vocabulary and head, an ablation).
        image_embed_dim: width of the code embeddings before the projector.
        image_positions: how a code's place in the image is embedded: ``raster`` (OmniMamba),
            ``rowcol``, ``tile:T`` or ``none`` (:mod:`mmdistill.image_vocab`).
        lora: see :class:`LoraOptions`.
        t2i: caption sources (``{"image", "caption"}`` JSONL, or ``builtin:shapes-t2i``); the
            mmu task trains on ``data.train``.
        caption_dropout: probability of dropping a caption in training (for classifier-free
            guidance).
        max_caption_tokens: caption tokens kept (OmniMamba: 68).
        cache_dir: where encoded captions are cached (default: the mmdistill cache).
    """

    image_tokenizer: str = "builtin:shapes-vq"
    image_tokenizer_config: dict[str, Any] | None = None
    vocabulary: Literal["decoupled", "shared"] = "decoupled"
    image_embed_dim: int = Field(256, ge=1)
    image_positions: str = Field("raster", pattern=r"^(raster|rowcol|none|tile:[1-9][0-9]*)$")
    lora: LoraOptions = Field(default_factory=LoraOptions)
    t2i: list[DataSource] = Field(min_length=1)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    max_caption_tokens: int = Field(68, ge=1)
    cache_dir: str | None = None


class StageSpec(_Strict):
    """One training stage.

    Attributes:
        name: label used in logs, checkpoints and the report.
        trainable: parameter groups that train (roles, see :data:`mmdistill.roles.ROLES`); everything else is
            frozen.
        loss: see :class:`LossSpec`.
        lr, weight_decay, betas, eps: AdamW settings (weight decay applies to matrices only).
        schedule: see :class:`ScheduleSpec`.
        steps / tokens: stage length as optimiser steps, or as tokens (converted to steps with
            ``batch_size * grad_accum * processes * seq_len`` tokens per step).
        batch_size: sequences per process per micro-step.
        grad_accum: micro-steps per optimiser step.
        clip_grad: gradient-norm clipping threshold (``None``: no clipping).
        task: ``distill`` (the default: a distillation stage with ``loss``), or an OmniMamba
            stage (needs the recipe's ``omni`` section): ``mmu`` or ``t2i`` alone, or ``both``
            with ``task_ratio`` rows of each task per micro-step. A task stage's loss is each
            task's cross-entropy, summed (:mod:`mmdistill.omni_objective`); its ``lora`` role
            means the adapters of its own task(s).
        task_ratio: rows per micro-step of each task in a ``both`` stage (OmniMamba: mmu 3,
            t2i 48); replaces ``batch_size`` there.
    """

    name: str = Field(min_length=1)
    task: Literal[STAGE_TASKS] = "distill"
    loss: LossSpec | None = None
    trainable: list[Role] = Field(min_length=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    clip_grad: float | None = Field(1.0, gt=0)
    task_ratio: TaskRatio | None = None

    @model_validator(mode="after")
    def _task(self):
        if self.task == "distill" and self.loss is None:
            raise ValueError("a distillation stage needs a loss (e.g. loss: {kl_weight: 1.0})")
        if self.task != "distill" and self.loss is not None:
            raise ValueError(
                f"a {self.task} stage's loss is fixed (each task's cross-entropy); remove 'loss'"
            )
        if (self.task == "both") != (self.task_ratio is not None):
            raise ValueError("give task_ratio (e.g. {mmu: 3, t2i: 48}) exactly for task: both")
        return self

    @property
    def tasks(self) -> tuple[str, ...]:
        """The OmniMamba tasks this stage trains (none for a distillation stage)."""
        return {"distill": (), "mmu": ("mmu",), "t2i": ("t2i",), "both": ("mmu", "t2i")}[self.task]

    def rows(self, task: str) -> int:
        """Rows of ``task`` per micro-step."""
        return getattr(self.task_ratio, task) if self.task_ratio is not None else self.batch_size

    @field_validator("name")
    @classmethod
    def _name(cls, value: str):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ValueError(f"{value!r}: use letters, digits, '_', '.' and '-' only")
        return value

    @field_validator("trainable")
    @classmethod
    def _roles(cls, value: list[str], info: ValidationInfo):
        if len(set(value)) != len(value):
            raise ValueError(f"roles listed twice: {value}")
        loss = info.data.get("loss")
        if info.data.get("task", "distill") != "distill":
            return value
        if loss is not None and loss.layerwise:
            extra = [r for r in value if r not in MIXER_ROLES]
            if extra:
                raise ValueError(
                    f"{extra} cannot train in a layer-wise (MSE-only) stage, which runs only the "
                    f"mixers ({', '.join(MIXER_ROLES)}); add a kl_weight or ce_weight for an "
                    "end-to-end stage"
                )
        return value

    @field_validator("tokens")
    @classmethod
    def _length(cls, value: int | None, info: ValidationInfo):
        if "steps" in info.data and (info.data["steps"] is None) == (value is None):
            raise ValueError("set exactly one of 'steps' and 'tokens'")
        return value


class DistributedSpec(_Strict):
    """Multi-process settings.

    Attributes:
        deepspeed: path of a DeepSpeed JSON config (ZeRO-2 or ZeRO-3); ``None`` runs plain
            PyTorch (DDP when launched on several processes).
    """

    deepspeed: str | None = None

    @field_validator("deepspeed")
    @classmethod
    def _config(cls, value: str | None):
        if value is None:
            return value
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"DeepSpeed config not found: {value}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{value} is not valid JSON: {exc}") from None
        stage = (config.get("zero_optimization") or {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"{value}: zero_optimization.stage must be 0-3, got {stage!r}")
        return value


class LoggingSpec(_Strict):
    """Metrics: ``metrics.jsonl`` always; TensorBoard and a progress bar optionally.

    Attributes:
        every: log every N optimiser steps (the first and last steps are always logged).
        tensorboard: also write TensorBoard events under ``output_dir/tensorboard``.
        progress: show a rich progress bar on stderr (rank 0).
    """

    every: int = Field(10, ge=1)
    tensorboard: bool = True
    progress: bool = True


class CheckpointSpec(_Strict):
    """Training checkpoints under ``output_dir/checkpoints``.

    Attributes:
        every: save every N optimiser steps within a stage (0: only at the end of each stage).
        keep: how many complete checkpoints to keep (older ones are deleted).
    """

    every: int = Field(0, ge=0)
    keep: int = Field(2, ge=1)


class GatesSpec(_Strict):
    """Quality gates checked on held-out data once the student is written
    (:mod:`mmdistill.gates`; ``mmdistill run`` exits 4 when one fails).

    Attributes:
        checks: gates as ``METRIC OP NUMBER`` (``kl<=0.15``, ``ppl_ratio<=1.1``,
            ``answer_accuracy_ratio>=0.9``, ``top1_agreement>=0.8``, ...).
        data: held-out sources the student is evaluated on against the teacher (default:
            ``data.eval``).
        max_tokens: scored tokens per file at most.
        max_questions: questions answered per file at most.
        batch_size: sequences per forward.
    """

    checks: list[str] = Field(default_factory=list)
    data: list[DataSource] = Field(default_factory=list)
    max_tokens: int | None = Field(16384, ge=1)
    max_questions: int | None = Field(64, ge=0)
    batch_size: int = Field(4, ge=1)

    @field_validator("checks")
    @classmethod
    def _checks(cls, value: list[str]):
        parse_gates(value)
        return value

    @property
    def parsed(self) -> list[Gate]:
        """The checks as :class:`~mmdistill.gates.Gate` objects."""
        return parse_gates(self.checks)


class Recipe(_Strict):
    """A whole distillation run.

    Attributes:
        name: label of the run.
        teacher: ``builtin:NAME``, an alias (``hovle``), a model directory, a ``.gguf`` file or
            a hub id; or leave it out and give ``student_dir``.
        student_dir: start from this saved student instead of seeding one from a teacher
            (only task stages can run then: distillation needs the teacher).
        omni: see :class:`OmniSpec` (needed by task stages).
        gates: see :class:`GatesSpec`.
        teacher_dtype: dtype the frozen teacher is held in (default: float32 with
            ``precision: fp32``, else bfloat16).
        verify_teacher: check the teacher's conversion against transformers' own forward
            before anything trains (:mod:`mmdistill.teachers.verify`); ``false`` skips it with
            a warning.
        student: see :class:`StudentSpec`.
        data: see :class:`DataSpec`.
        stages: run in order; each starts from the previous one's weights.
        precision: ``fp32`` or ``bf16`` (autocast with float32 master weights; with DeepSpeed
            its bf16 mode).
        gradient_checkpointing: recompute activations in the backward pass (end-to-end stages:
            per decoder layer; layer-wise stages: per mixer).
        distributed: see :class:`DistributedSpec`.
        logging: see :class:`LoggingSpec`.
        checkpoint: see :class:`CheckpointSpec`.
        output_dir: run directory; the final student goes to ``output_dir/student``.
        seed: seed of torch's RNG in every process.
    """

    name: str = "distill"
    teacher: str | None = Field(None, min_length=1)
    student_dir: str | None = Field(None, min_length=1)
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    verify_teacher: bool = True
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: DataSpec
    stages: list[StageSpec] = Field(min_length=1)
    precision: Literal["fp32", "bf16"] = "bf16"
    gradient_checkpointing: bool = False
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    output_dir: str = Field(min_length=1)
    seed: int = 0
    omni: OmniSpec | None = None
    gates: GatesSpec = Field(default_factory=GatesSpec)

    @model_validator(mode="after")
    def _start(self):
        if (self.teacher is None) == (self.student_dir is None):
            raise ValueError("give exactly one of 'teacher' (seed a student) and 'student_dir'")
        distill = [s.name for s in self.stages if s.task == "distill"]
        if self.student_dir is not None and distill:
            raise ValueError(f"stages {distill} distil from a teacher; this recipe has none")
        tasks = [s.name for s in self.stages if s.task != "distill"]
        if tasks and self.omni is None:
            raise ValueError(f"stages {tasks} train OmniMamba tasks; add an 'omni' section")
        return self

    @model_validator(mode="after")
    def _gates(self):
        if not self.gates.checks:
            return self
        if self.teacher is None:
            raise ValueError("gates compare the student with its teacher; this recipe has none")
        if not self.gate_data:
            raise ValueError("gates need held-out data: set gates.data or data.eval")
        return self

    @property
    def gate_data(self) -> list[DataSource]:
        """The held-out sources the gates are checked on."""
        return self.gates.data or self.data.eval

    def with_gates(self, checks: list[str]) -> Recipe:
        """This recipe with ``checks`` added to its gates (validated like the file's)."""
        if not checks:
            return self
        data = self.model_dump(mode="json")
        data["gates"]["checks"] = [*self.gates.checks, *checks]
        return validate_recipe(data, origin="--gate")

    @model_validator(mode="after")
    def _unique_stage_names(self):
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes}")
        before = self.student.layout_before
        if before is not None and not is_auto(self.student.attention_layers):
            raise ValueError("student.layout_before applies to auto:K attention layers only")
        if before is not None and before not in names:
            raise ValueError(f"student.layout_before: no stage named {before!r}; stages: {names}")
        return self

    @property
    def resolved_teacher_dtype(self) -> str:
        if self.teacher_dtype is not None:
            return self.teacher_dtype
        return "float32" if self.precision == "fp32" else "bfloat16"

    def missing_files(self) -> list[str]:
        """Data files named by the recipe that do not exist (``key: path`` strings)."""
        out = []
        sources = [(f"data.{split}", getattr(self.data, split)) for split in ("train", "eval")]
        sources.append(("gates.data", self.gates.data))
        if self.omni is not None:
            sources.append(("omni.t2i", self.omni.t2i))
        for where, specs in sources:
            for i, src in enumerate(specs):
                if not src.is_builtin and not Path(src.source).is_file():
                    out.append(f"{where}.{i}.source: file not found: {src.source}")
                if src.image_root is not None and not Path(src.image_root).is_dir():
                    out.append(f"{where}.{i}.image_root: not a directory: {src.image_root}")
        if self.student_dir is not None and not (Path(self.student_dir) / "config.json").is_file():
            out.append(f"student_dir: not a saved student: {self.student_dir}")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------
# YAML and overrides
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 needs a dot: ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``1e-3`` → float, ``[1, 2]`` → list, ``null`` → None)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply OmegaConf-dotlist-style ``key=value`` overrides to a copy of ``data``.

    Raises:
        RecipeError: for an override without ``=``, a list index that is not an integer or is out
            of range, or a path through a scalar; the message names the key.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not key=value (e.g. stages.0.lr=1e-3)")
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not re.fullmatch(r"\d+", part):
                    raise RecipeError(f"{here}: {'.'.join(parts[:depth])} is a list; use an index")
                index = int(part)
                if index >= len(node):
                    raise RecipeError(
                        f"{here}: index {index} is out of range "
                        f"({'.'.join(parts[:depth])} has {len(node)} entries)"
                    )
                if last:
                    node[index] = parse_value(raw)
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = parse_value(raw)
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError(f"{here}: {'.'.join(parts[:depth])} is a value, not a section")
    return data


def format_errors(error: ValidationError) -> str:
    """Every problem of ``error`` as ``key.path: message``, joined by ``"; "``."""
    lines = []
    for e in error.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(recipe)"
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        elif e["type"] == "missing":
            message = "required key is missing"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if e["type"] not in ("extra_forbidden", "missing") and "input" in e:
            shown = repr(e["input"])
            if len(shown) <= 60 and not isinstance(e["input"], dict):
                message += f" (got {shown})"
        lines.append(f"{path}: {message}")
    return "; ".join(lines)


def validate_recipe(data: Any, origin: str = "recipe") -> Recipe:
    """Validate a plain dict into a :class:`Recipe`.

    Raises:
        RecipeError: listing every problem as ``key.path: message``.
    """
    if not isinstance(data, dict):
        raise RecipeError(
            f"{origin}: the recipe must be a mapping of keys, got {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{origin}: {format_errors(exc)}") from None


def read_recipe_file(path: str | Path) -> dict:
    """The raw mapping of a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty")
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: the recipe must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file (no model or data is touched)."""
    data = apply_overrides(read_recipe_file(path), list(overrides or []))
    return validate_recipe(data, origin=str(path))
