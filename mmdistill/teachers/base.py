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

    def front_end_files(self, directory, config: LMConfig) -> dict:
        """Front-end settings read from the checkpoint's folder besides ``config.json`` (e.g.
        an image processor's), merged into ``config.front_end`` by ``load_teacher``."""
        return {}


ADAPTERS: list[TeacherAdapter] = []


def register_adapter(adapter: TeacherAdapter) -> TeacherAdapter:
    """Make ``adapter`` available to :func:`mmdistill.load_teacher`."""
    ADAPTERS.append(adapter)
    return adapter


# Architectures users ask for that no adapter reads, and why (named in the refusal).
REFUSED = {
    "GPTNeoXForCausalLM": "attention and MLP run in parallel on LayerNorm, not RMSNorm",
    "GPT2LMHeadModel": "LayerNorm and learned absolute positions instead of RMSNorm and RoPE",
    "Qwen2VLForConditionalGeneration": "M-RoPE (3-D rotary positions for images and video), "
    "which the canonical attention cannot express",
    "Qwen2_5_VLForConditionalGeneration": "M-RoPE (3-D rotary positions for images and "
    "video), which the canonical attention cannot express",
    "InternVLForConditionalGeneration": "InternVL's processor tiles each image into crops "
    "and its projector pixel-shuffles the features, which the LLaVA front-end does not do yet",
    "Gemma3ForConditionalGeneration": "a front-end for Gemma 3's vision tower is not built "
    "yet (its text model, Gemma3ForCausalLM, converts)",
}


def find_adapter(hf_config: dict, source: str) -> TeacherAdapter:
    """The first registered adapter that reads ``hf_config``.

    Raises:
        TeacherError: none does: naming why for architectures in :data:`REFUSED`, the supported
            ones, and how to add an adapter.
    """
    for adapter in ADAPTERS:
        if adapter.matches(hf_config):
            return adapter
    supported = "; ".join(f"{a.name} ({', '.join(a.architectures)})" for a in ADAPTERS)
    advice = (
        f"Supported: {supported}. To add one, subclass mmdistill.teachers.TeacherAdapter and "
        "register it with mmdistill.teachers.register_adapter (docs/adapters.md)."
    )
    archs = [str(a) for a in hf_config.get("architectures") or []]
    if not archs:
        raise TeacherError(
            f"{source}: config.json names no 'architectures' (model_type "
            f"{hf_config.get('model_type', 'unknown')!r}), so no adapter can be chosen; add the "
            'class transformers saves, e.g. "architectures": ["LlamaForCausalLM"]. ' + advice
        )
    why = next((REFUSED[a] for a in archs if a in REFUSED), None)
    reason = f": {why}" if why else ""
    raise TeacherError(
        f"{source}: architecture {', '.join(archs)} is not supported{reason}. {advice}"
    )
