"""Loading and saving image tokenizers: :class:`ImageTokenizer` and :func:`load_image_tokenizer`.

A source is one of:

* ``builtin:shapes-vq`` -- the small VQ of the shapes world shipped in the package, LlamaGen's
  architecture (``mmdistill/assets/shapes_vq``: 64 px images -> 8 x 8 codes);
* ``builtin:shapes-vq-patch`` -- the same world's patch-local VQ (``architecture="patch"``: each
  code is one 8 x 8 patch; ``mmdistill/assets/shapes_vq_patch``), the OmniMamba demo's;
  both rebuilt by ``scripts/build_shapes_vq.py`` with the arguments in :data:`REBUILD`;
* a directory written by :meth:`ImageTokenizer.save` (``config.json`` + ``model.safetensors``);
* a LlamaGen checkpoint file: ``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` read with
  ``torch.load(weights_only=True)`` (tensors and plain containers only). LlamaGen's training
  checkpoints hold ``{"model": state_dict, "ema": ..., ...}``; the weights are taken from
  ``"ema"``, else ``"model"``, else ``"state_dict"`` (LlamaGen's own order), else the file is
  taken as a bare state dict. A file carries no sizes: pass them as ``config``
  (default :data:`~mmdistill.image_tokenizer.vq.LLAMAGEN_VQ16`).

Loading is strict: a missing key, an unexpected key or a tensor of another shape is a
:class:`~mmdistill.errors.CheckpointError` naming the file and the first offending keys. The one
key tolerated is ``quantize.codebook_used``, LlamaGen's record of recently used codes (a training
statistic, not a weight), which is dropped. Nothing is downloaded: a hub name is an error that
asks for a local path. The model comes back frozen (eval mode, no gradients).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import WEIGHTS_NAME, atomic_directory, read_safetensors
from .pixels import images_to_tensor, tensor_to_images
from .vq import LLAMAGEN_VQ16, VQConfig, VQModel

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_IMAGE_TOKENIZERS = {
    "shapes-vq": ASSETS / "shapes_vq",
    "shapes-vq-patch": ASSETS / "shapes_vq_patch",
}
"""The shipped shapes-world VQs by ``builtin:`` name."""
REBUILD = {
    "shapes-vq": "--architecture llamagen --device cuda --steps 3500 --batch 64 --scenes 4000 "
    "--centred-repeats 4 --lr 2e-3",
    "shapes-vq-patch": "--threads 2",
}
"""``scripts/build_shapes_vq.py`` arguments (besides ``--out``) that rebuild each built-in."""
CONFIG_NAME = "config.json"
TOLERATED_KEYS = ("quantize.codebook_used",)
"""Keys of LlamaGen checkpoints that are not weights; dropped on load."""
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPERS = ("ema", "model", "state_dict")


class ImageTokenizer:
    """A frozen :class:`VQModel` with PIL in and out, a digest, and saving.

    Attributes:
        model: the VQ model (eval mode, ``requires_grad`` off).
        source: where it was loaded from (recorded by :meth:`save`).
    """

    def __init__(self, model: VQModel, source: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self._digest: str | None = None

    @property
    def config(self) -> VQConfig:
        """The model's sizes."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.model.quantize.embedding.weight.device

    @property
    def digest(self) -> str:
        """First 16 hex digits of a SHA-256 over the config and every weight (a cache key)."""
        if self._digest is None:
            h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._digest = h.hexdigest()[:16]
        return self._digest

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Codes ``[n, grid, grid]`` (long, on the model's device) of PIL images, resized to
        ``config.image_size`` as :func:`~mmdistill.image_tokenizer.pixels.images_to_tensor`
        does."""
        pixels = images_to_tensor(images, self.config.image_size).to(self.device)
        return self.model.encode(pixels)

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor) -> list[Image.Image]:
        """PIL images from codes ``[n, h, w]``."""
        return tensor_to_images(self.model.decode(codes.to(self.device)))

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` atomically; returns the directory.

        Raises:
            CheckpointError: ``directory`` is not empty and ``overwrite`` is false.
        """
        with atomic_directory(Path(directory), overwrite=overwrite) as tmp:
            write_tokenizer_files(tmp, self.model, self.source)
        return Path(directory)


def write_tokenizer_files(directory: Path, model: VQModel, source: str = "") -> None:
    """Write a tokenizer's ``config.json`` and ``model.safetensors`` into ``directory``."""
    record = {"kind": "vq", "config": model.config.to_dict(), "source": source}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")


def load_image_tokenizer(
    source: str | Path, config: VQConfig | None = None, device: str | torch.device = "cpu"
) -> ImageTokenizer:
    """Load a frozen image tokenizer from ``source`` (see the module docstring).

    Args:
        source: ``builtin:NAME``, a directory written by :meth:`ImageTokenizer.save`, or a
            LlamaGen checkpoint file.
        config: the sizes of a checkpoint file (default LlamaGen VQ-16); a directory carries
            its own, and a different ``config`` for it is an error.
        device: where to put the model.

    Raises:
        CheckpointError: an unknown or missing source, an unreadable file, or weights that do
            not fit the config exactly.
    """
    path, name = _resolve(source)
    if path.is_dir():
        stored = _directory_config(path)
        if config is not None and config != stored:
            raise CheckpointError(
                f"{path} holds a tokenizer of {stored}; it was asked for {config}. "
                "Leave the config out for a saved directory (it carries its own)"
            )
        config, state, where = stored, read_safetensors(path), path / WEIGHTS_NAME
    else:
        config, state, where = config or LLAMAGEN_VQ16, read_checkpoint_file(path), path
    with torch.device("meta"):
        model = VQModel(config)
    check_state_dict(state, model, where)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(_drop_tolerated(weights), strict=True, assign=True)
    return ImageTokenizer(model.to(device), source=name)


def _resolve(source: str | Path) -> tuple[Path, str]:
    text = str(source)
    if text.startswith("builtin:"):
        key = text.split(":", 1)[1]
        if key not in BUILTIN_IMAGE_TOKENIZERS:
            known = ", ".join(f"builtin:{n}" for n in BUILTIN_IMAGE_TOKENIZERS)
            raise CheckpointError(f"unknown built-in image tokenizer {text}; known: {known}")
        path = BUILTIN_IMAGE_TOKENIZERS[key]
        if not (path / WEIGHTS_NAME).exists():
            raise CheckpointError(
                f"{text} is not in this installation ({path} is missing); reinstall mmdistill "
                f"from a full checkout, or rebuild it with "
                f"`python scripts/build_shapes_vq.py --out {path} {REBUILD[key]}`"
            )
        return path, text
    path = Path(text).expanduser()
    if path.exists():
        return path, text
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix:
        raise CheckpointError(
            f"{text!r} looks like a Hugging Face Hub name, but mmdistill does not download image "
            "tokenizers; download the checkpoint (e.g. LlamaGen's vq_ds16_c2i.pt) and give its "
            "local path"
        )
    raise CheckpointError(f"image tokenizer not found: {path} does not exist")


def _directory_config(path: Path) -> VQConfig:
    file = path / CONFIG_NAME
    try:
        record: dict[str, Any] = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}; is {path} an image tokenizer?") from exc
    if record.get("kind") != "vq":
        raise CheckpointError(f"{file} is not an image tokenizer's (kind {record.get('kind')!r})")
    try:
        return VQConfig.from_dict(record.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def read_checkpoint_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` or ``torch.save`` file (wrappers unpacked).

    Raises:
        CheckpointError: the file cannot be read, or holds no state dict.
    """
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix not in _PICKLE_SUFFIXES:
            raise ValueError(f"unknown suffix {path.suffix!r} (use .safetensors, .pt, .pth, .bin)")
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read image tokenizer checkpoint {path}: {exc}") from exc
    return _unwrap(data, path)


def _unwrap(data: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(data, dict):
        for key in _WRAPPERS:
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(
            f"{path} holds no state dict (expected tensors by name, or a dict with "
            f"{' / '.join(repr(k) for k in _WRAPPERS)} holding them)"
        )
    return data


def _drop_tolerated(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k not in TOLERATED_KEYS}


def check_state_dict(state: dict[str, torch.Tensor], model: VQModel, where: Path) -> None:
    """Raise one :class:`CheckpointError` if ``state`` does not fit ``model`` key for key.

    The message names ``where``, the first few missing and unexpected keys and wrong shapes
    (expected vs got), and says how to pass the sizes the checkpoint was trained with.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in _drop_tolerated(state).items()}
    problems = _first("missing", sorted(expected.keys() - got.keys()))
    problems += _first("unexpected", sorted(got.keys() - expected.keys()))
    wrong = [k for k in expected if k in got and got[k] != expected[k]]
    problems += [f"{k}: expected shape {list(expected[k])}, got {list(got[k])}" for k in wrong[:3]]
    if len(wrong) > 3:
        problems.append(f"... {len(wrong) - 3} more of the wrong shape")
    if problems:
        raise CheckpointError(
            f"{where} does not fit the VQ model of {model.config}: "
            + "; ".join(problems)
            + ". Pass the sizes it was trained with (load_image_tokenizer(..., "
            "config=VQConfig(...)) / --vq-config)"
        )


def _first(kind: str, keys: list[str], count: int = 3) -> list[str]:
    if not keys:
        return []
    more = f" (and {len(keys) - count} more)" if len(keys) > count else ""
    return [f"{kind} key(s) {', '.join(keys[:count])}{more}"]
