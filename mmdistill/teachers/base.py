"""The teacher-adapter interface and its declarative weight mapping.

An adapter turns one family of checkpoints into a :class:`~mmdistill.model.DecoderLM`:

* ``matches(hf_config)`` says whether it reads a checkpoint (by ``architectures`` /
  ``model_type``);
* ``lm_config(hf_config)`` gives the canonical :class:`~mmdistill.model.LMConfig`;
* ``rules(hf_config)`` lists :class:`Rule` objects mapping source keys to canonical keys.

:func:`apply_rules` fails on any source key no rule claims and on any canonical parameter left
unset, so a new in-house architecture cannot be half-converted silently. Adding one is a small
class registered with :func:`register_adapter` (see docs/adapters.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import TeacherError
from ..model import LMConfig

Transform = Callable[[torch.Tensor, re.Match], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Rule:
    """Map source keys matching ``pattern`` (full match) to canonical keys.

    ``target`` is a format string using the pattern's groups (``"layers.{0}.mlp.up_proj.{1}"``),
    ``None`` to drop the key on purpose (e.g. rotary buffers), or a callable
    ``(tensor, match) -> {canonical key: tensor}`` for keys that split (fused QKV).
    """

    pattern: str
    target: str | Transform | None

    def apply(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        match = re.fullmatch(self.pattern, key)
        if match is None:
            return None
        if self.target is None:
            return {}
        if isinstance(self.target, str):
            return {self.target.format(*match.groups()): tensor}
        return self.target(tensor, match)


def apply_rules(
    rules: list[Rule],
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Size],
    source: str,
) -> dict[str, torch.Tensor]:
    """Convert ``tensors`` with ``rules`` and check the result against ``expected`` shapes."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in tensors.items():
        for rule in rules:
            mapped = rule.apply(key, tensor)
            if mapped is not None:
                out.update(mapped)
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise TeacherError(
            f"{source}: {len(unmapped)} weight(s) are not understood by the adapter, e.g. "
            f"{', '.join(sorted(unmapped)[:5])}. The checkpoint does not match its declared "
            "architecture, or the adapter needs a rule for them."
        )
    missing = sorted(set(expected) - set(out))
    if missing:
        raise TeacherError(
            f"{source}: weights missing or partial: {len(missing)} parameter(s) absent, e.g. "
            f"{', '.join(missing[:5])}"
        )
    extra = sorted(set(out) - set(expected))
    if extra:
        raise TeacherError(f"{source}: adapter produced unknown parameters {extra[:5]}")
    for key, shape in expected.items():
        if tuple(out[key].shape) != tuple(shape):
            raise TeacherError(
                f"{source}: {key} has shape {tuple(out[key].shape)}, expected {tuple(shape)} "
                "from config.json"
            )
    return out


class TeacherAdapter:
    """Base class; subclasses set ``name`` and ``architectures`` and implement the methods."""

    name: str = ""
    architectures: tuple[str, ...] = ()
    description: str = ""

    def matches(self, hf_config: dict) -> bool:
        archs = hf_config.get("architectures") or []
        return any(a in self.architectures for a in archs)

    def lm_config(self, hf_config: dict) -> LMConfig:
        raise NotImplementedError

    def rules(self, hf_config: dict) -> list[Rule]:
        raise NotImplementedError


ADAPTERS: list[TeacherAdapter] = []


def register_adapter(adapter: TeacherAdapter) -> TeacherAdapter:
    """Make ``adapter`` available to :func:`mmdistill.load_teacher`."""
    ADAPTERS.append(adapter)
    return adapter


def find_adapter(hf_config: dict, source: str) -> TeacherAdapter:
    for adapter in ADAPTERS:
        if adapter.matches(hf_config):
            return adapter
    archs = hf_config.get("architectures") or [hf_config.get("model_type", "unknown")]
    supported = "; ".join(f"{a.name} ({', '.join(a.architectures)})" for a in ADAPTERS)
    raise TeacherError(
        f"{source}: architecture {', '.join(map(str, archs))} is not supported. Supported: "
        f"{supported}. To add one, subclass mmdistill.teachers.TeacherAdapter and register it "
        "with mmdistill.teachers.register_adapter (docs/adapters.md)."
    )
