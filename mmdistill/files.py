"""Files on disk: reading safetensors (single file or sharded index), hashing, the cache root,
and writing files and checkpoint directories atomically (temporary name, then rename) so a crash
never leaves a half-written result that looks complete. Every atomic write of the package goes
through :func:`atomic_write_bytes`, :func:`atomic_write_text` or :func:`atomic_directory`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, ResourceError

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
# Files copied next to a student so it tokenises and templates exactly like its teacher.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def cache_root() -> Path:
    """Where built-in teachers, dequantised GGUF files and generated data are cached
    (``$MMDISTILL_CACHE``, default ``~/.cache/mmdistill``)."""
    return Path(os.environ.get("MMDISTILL_CACHE", Path.home() / ".cache" / "mmdistill"))


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = sorted(set(mapping.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointError(f"{directory} is partial: shards missing: {', '.join(missing)}")
        return [directory / f for f in files]
    single = directory / WEIGHTS_NAME
    if single.exists():
        return [single]
    others = sorted(directory.glob("*.safetensors"))
    if others:
        return others
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory} has only pickle weights (.bin/.pt); convert them to safetensors first "
            "(mmdistill never unpickles model files)"
        )
    raise CheckpointError(f"no safetensors weights found in {directory}")


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return tensors


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def save_sharded(
    tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 2 << 30
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` or shards plus an index. Returns file names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return [WEIGHTS_NAME]
    names = []
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        names.append(name)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    (directory / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return names


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full: an ``OSError`` with ``ENOSPC``, or a library's
    wrapper of one (safetensors raises ``SafetensorError``, not an ``OSError``)."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text


def disk_full_error(target: Path, kept: str, written: int | None = None) -> ResourceError:
    """The message for a write to ``target`` that ran out of space: the space it needed (at
    least ``written`` bytes, what went out before the disk filled), the space left, and what was
    kept."""
    try:
        free = f"{shutil.disk_usage(Path(target).parent).free / 2**20:,.0f} MiB left"
    except OSError:
        free = "space left unknown"
    needed = "" if not written else f"it needs more than {written / 2**20:,.1f} MiB; "
    return ResourceError(
        f"disk full while writing {target} ({needed}{free} on its filesystem); {kept}",
        hint="free some space (or write elsewhere) and run again; a run continues with --resume",
    )


def _tree_bytes(directory: Path) -> int:
    """Bytes of the files under ``directory`` (0 if it is gone)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    Raises:
        ResourceError: the disk is full (``path`` is left as it was).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, "it was not replaced", len(data)) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``target`` only if the block succeeds.

    On error the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"{target} exists and is not empty (use --force to overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException as exc:
        written = _tree_bytes(tmp) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            kept = f"{target} keeps what it held" if target.exists() else "nothing was written"
            raise disk_full_error(target, kept, written) from exc
        raise


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
