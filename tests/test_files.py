"""Atomic writes: a failed write leaves the old file (or nothing) and no temporary behind."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import mmdistill.files as files
from mmdistill.errors import ResourceError


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    files.atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        files.atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_a_full_disk_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "x.txt"
    files.atomic_write_text(target, "old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(ResourceError, match="disk full while writing .* needs more than"):
        files.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
