"""Resolve a teacher source (alias, local directory, GGUF file or hub id) and load it as a
:class:`~mmdistill.model.DecoderLM` with provenance recorded in ``config.teacher``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..errors import TeacherError
from ..files import atomic_directory, cache_root, read_safetensors, sha256_file, weight_files
from ..model import DecoderLM, LMConfig, build_from_state_dict, expected_shapes
from .base import TeacherAdapter, apply_rules, find_adapter
from .builtin import builtin_teacher
from .verify import verify_conversion

log = logging.getLogger(__name__)

ALIASES = {"hovle": "OpenGVLab/HoVLE"}


def resolve_source(source: str) -> Path:
    """A local directory holding ``config.json`` and safetensors weights for ``source``."""
    if source.startswith("builtin:"):
        return builtin_teacher(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TeacherError(f"{path} has no config.json; is it a model directory?")
        return path
    if path.suffix == ".gguf":
        if not path.exists():
            raise TeacherError(f"GGUF file not found: {path}")
        return gguf_to_folder(path)
    if path.exists():
        raise TeacherError(f"{path} is neither a model directory nor a .gguf file")
    repo = ALIASES.get(source.lower(), source)
    if repo == source and path.parent != Path(".") and path.parent.is_dir():
        raise TeacherError(
            f"{path} does not exist (its folder {path.parent} does); check the name, or, for "
            f"the hub id {source!r}, run from a directory without a {path.parent} folder"
        )
    if repo.count("/") != 1 or source.startswith((".", "/", "~")):
        raise TeacherError(
            f"teacher source {source!r} is not a local directory, a .gguf file, a known alias "
            f"({', '.join(ALIASES)}) or a hub id (owner/name)"
        )
    return fetch_from_hub(repo, source)


def fetch_from_hub(repo: str, source: str) -> Path:
    """Use the local hub cache, else try the hub briefly; offline, fail fast with advice."""
    hint = (
        f"download {repo} on a machine with hub access (e.g. `hf download {repo} --local-dir "
        f"DIR`) and pass --teacher DIR"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise TeacherError(
            f"huggingface_hub is not installed, so {source!r} cannot be fetched; {hint}"
        ) from exc
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise TeacherError(
            f"{repo} is not in the local hub cache and HF_HUB_OFFLINE is set; {hint}"
        )
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo, timeout=10)
        return Path(
            snapshot_download(
                repo,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
            )
        )
    except Exception as exc:
        raise TeacherError(
            f"could not fetch {repo} from the Hugging Face hub ({type(exc).__name__}); offline? {hint}"
        ) from exc


def gguf_to_folder(path: Path) -> Path:
    """Dequantise a GGUF file once into a cached HF folder (config, safetensors, tokenizer)."""
    digest = sha256_file(path)[:16]
    out = cache_root() / "gguf" / f"{path.stem}-{digest}"
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise TeacherError("transformers is needed to read GGUF files") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise TeacherError(
            f"reading {path} needs the 'gguf' package: pip install gguf ({exc})"
        ) from exc
    except Exception as exc:
        raise TeacherError(f"cannot read GGUF file {path}: {exc}") from exc
    # The weights are already dequantised to float32, but transformers keeps the GGUF quantizer
    # attached and then refuses to save; the checkpoint we write is a plain float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / ".complete").write_text(str(path))
    return out


def read_config(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise TeacherError(f"{directory / 'config.json'} is not valid JSON: {exc}") from exc


def teacher_config(source: str) -> LMConfig:
    """The canonical configuration of a teacher from its ``config.json`` alone (no weights read),
    e.g. to check a recipe's layer indices before the teacher loads."""
    directory = resolve_source(str(source))
    hf_config = read_config(directory)
    return _lm_config(find_adapter(hf_config, str(source)), hf_config, str(source))


def _lm_config(adapter: TeacherAdapter, hf_config: dict, source: str) -> LMConfig:
    try:
        return adapter.lm_config(hf_config)
    except (KeyError, ValueError) as exc:
        raise TeacherError(f"{source}: unsupported or malformed config.json: {exc}") from exc


def convert_checkpoint(
    adapter: TeacherAdapter,
    hf_config: dict,
    tensors: dict[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
) -> DecoderLM:
    """The canonical model of a checkpoint (``config.json`` and weights) through ``adapter``."""
    config = _lm_config(adapter, hf_config, source)
    with torch.device("meta"):
        shapes = expected_shapes(DecoderLM(config))
    converted = apply_rules(adapter.rules(hf_config), tensors, shapes, source)
    return build_from_state_dict(config, converted, dtype)


def load_teacher(
    source: str,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> DecoderLM:
    """Load a teacher from ``source`` (alias, directory, ``.gguf`` or hub id).

    With ``verify`` (the default) the conversion is first checked against transformers' own
    forward on a truncated copy of the weights (:mod:`mmdistill.teachers.verify`); without it, a
    warning is logged.

    Returns:
        A frozen, eval-mode :class:`DecoderLM` whose ``config.teacher`` records the source, the
        adapter, the sha256 of each weight file, the teacher's own ``config.json`` and what the
        verification checked (``verified``).

    Raises:
        TeacherError: the source cannot be read or converted, or the verification found a
            difference.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    directory = resolve_source(str(source))
    hf_config = read_config(directory)
    adapter = find_adapter(hf_config, str(source))
    tensors = read_safetensors(directory)
    model = convert_checkpoint(adapter, hf_config, tensors, str(source), dtype)
    model.config.front_end.update(adapter.front_end_files(directory, model.config))
    if verify:
        checked = verify_conversion(
            hf_config,
            tensors,
            model.config,
            lambda cfg, weights: convert_checkpoint(adapter, cfg, weights, str(source)),
            str(source),
            adapter.name,
        )
    else:
        log.warning("%s: conversion not verified against transformers (--no-verify)", source)
        checked = {"skipped": "verification turned off"}
    model.config.teacher = {
        "source": str(source),
        "directory": str(directory.resolve()),
        "adapter": adapter.name,
        "architectures": hf_config.get("architectures"),
        "weights_sha256": {p.name: sha256_file(p) for p in weight_files(directory)},
        "config": hf_config,
        "verified": checked,
    }
    if model.config.chat_template is None:
        model.config.chat_template = read_chat_template(directory)
    model = model.to(device)
    model.requires_grad_(False)
    return model


def read_chat_template(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.exists():
        try:
            template = json.loads(tok_cfg.read_text()).get("chat_template")
        except json.JSONDecodeError:
            return None
        return template if isinstance(template, str) else None
    return None
