"""Task-specific LoRA (OmniMamba): one peft LoRA adapter per task on every Mamba-2 mixer's input
projections, chosen per batch by its task.

The adapters sit on ``z_proj``, ``x_proj``, ``b_proj``, ``c_proj`` and ``dt_proj`` of every
mixer: the five row blocks of a standard Mamba-2 ``in_proj`` (z, x, B, C, dt), so each adapter is
exactly OmniMamba's LoRA on the fused projection with its rows split. Attention layers of a
hybrid student get none. Adapters are named by task (``mmu``, ``t2i``); with ``shared: true`` (the
ablation) one adapter named ``shared`` serves both tasks.

``use_task(model, task)`` activates the task's adapter in every LoRA layer without touching which
parameters train (peft's own ``set_adapter`` also flips ``requires_grad``, which would break a
step that sums both tasks' losses). ``merge_task`` folds one task's adapter into the base weights
and returns a plain per-task model.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

TASKS = ("mmu", "t2i")
SHARED_ADAPTER = "shared"
TARGET_MODULES = r".*mixer\.(z|x|b|c|dt)_proj"


@dataclass
class LoraSpec:
    """The adapters of a student (``config.lora``): rank, alpha, dropout, one per task or shared."""

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    shared: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r must be a positive integer; got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1); got {self.dropout!r}")

    @property
    def adapters(self) -> tuple[str, ...]:
        return (SHARED_ADAPTER,) if self.shared else TASKS

    def adapter_for(self, task: str) -> str:
        """The adapter a task runs with."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        return SHARED_ADAPTER if self.shared else task

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=TARGET_MODULES,
            bias="none",
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoraSpec:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown lora keys: {', '.join(unknown)}")
        return cls(**data)


def add_adapters(model: nn.Module, spec: LoraSpec) -> None:
    """Inject ``spec``'s adapters (B zero-initialised, so the model's function is unchanged)."""
    if not any(True for name, _ in model.named_modules() if name.endswith("mixer.z_proj")):
        raise ValueError("task LoRA needs Mamba-2 mixers; this model keeps attention everywhere")
    with warnings.catch_warnings():  # peft warns that a second adapter is being added
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in spec.adapters:
            inject_adapter_in_model(spec.peft_config(), model, adapter_name=name)
    use_adapter(model, spec.adapters[0])


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def use_adapter(model: nn.Module, adapter: str) -> None:
    """Make ``adapter`` the active one in every LoRA layer; ``requires_grad`` is left as it was."""
    layers = lora_layers(model)
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.set_adapter(adapter)
    for param, flag in flags:
        param.requires_grad_(flag)
    model.active_adapter_name = adapter


def active_adapter(model: nn.Module) -> str | None:
    """The adapter set by :func:`use_adapter` (``None`` for a model without adapters)."""
    return getattr(model, "active_adapter_name", None)


def adapter_of_parameter(name: str) -> str | None:
    """The adapter a parameter belongs to (``...lora_A.t2i.weight`` -> ``t2i``), else ``None``."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B"):
            return parts[i + 1]
    return None


def adapter_state_dict(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under peft's saved names (``base_model.model.`` prefix, no adapter
    name), as ``PeftModel.from_pretrained`` reads them."""
    out = {}
    for name, tensor in model.state_dict().items():
        if adapter_of_parameter(name) == adapter:
            key = name.replace(f".{adapter}.", ".")
            out[f"base_model.model.{key}"] = tensor.detach().contiguous()
    return out


@torch.no_grad()
def merge_into_base(model: nn.Module, adapter: str) -> None:
    """Fold ``adapter`` into every targeted projection and drop all adapters (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            base.weight += module.get_delta_weight(adapter).to(base.weight.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, base)
    model.active_adapter_name = None


def save_adapters(model: nn.Module, spec: LoraSpec, directory: str | Path) -> None:
    """Write each adapter as ``directory/adapters/NAME/`` in peft's layout
    (``adapter_config.json``, ``adapter_model.safetensors``), for peft users."""
    config = spec.peft_config().to_dict()
    config["target_modules"] = TARGET_MODULES
    for name in spec.adapters:
        target = Path(directory) / "adapters" / name
        target.mkdir(parents=True, exist_ok=True)
        save_file(adapter_state_dict(model, name), str(target / "adapter_model.safetensors"))
        (target / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
