"""Built-in teachers, named ``builtin:NAME`` wherever a teacher source is accepted.

* ``builtin:tiny-hovle`` -- a random-weight HoVLE-format checkpoint of a few hundred thousand
  parameters (smoke tests), written by :func:`~mmdistill.teachers.tiny_hovle.write_tiny_hovle`
  into the cache on first use (deterministic, a second or two);
* ``builtin:shapes-hovle`` -- the demo's trained HoVLE-format teacher, shipped in the package
  (``mmdistill/assets/shapes_hovle``; rebuilt by ``scripts/build_demo_teacher.py``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TeacherError
from ..files import atomic_directory, cache_root
from .tiny_hovle import write_tiny_hovle

SHAPES_HOVLE_DIR = Path(__file__).resolve().parents[1] / "assets" / "shapes_hovle"
"""The shipped demo teacher."""
TINY_HOVLE_VERSION = "tiny-hovle:1"
"""Cache stamp of ``builtin:tiny-hovle``; change it whenever its writer changes."""
BUILTIN_TEACHERS = ("shapes-hovle", "tiny-hovle")


def builtin_teacher(name: str) -> Path:
    """The directory of ``builtin:name``.

    Raises:
        TeacherError: an unknown name, or a shipped teacher missing from this installation.
    """
    if name == "tiny-hovle":
        return _cached_tiny_hovle()
    if name == "shapes-hovle":
        if not (SHAPES_HOVLE_DIR / "model.safetensors").exists():
            raise TeacherError(
                f"builtin:shapes-hovle is not in this installation ({SHAPES_HOVLE_DIR} is "
                "missing); reinstall mmdistill from a full checkout, or rebuild it with "
                f"`python scripts/build_demo_teacher.py --out {SHAPES_HOVLE_DIR}`"
            )
        return SHAPES_HOVLE_DIR
    raise TeacherError(
        f"unknown built-in teacher builtin:{name}; known: "
        + ", ".join(f"builtin:{n}" for n in BUILTIN_TEACHERS)
    )


def _cached_tiny_hovle() -> Path:
    out = cache_root() / "builtin" / "tiny-hovle"
    marker = out / ".complete"
    if not marker.exists() or marker.read_text() != TINY_HOVLE_VERSION:
        with atomic_directory(out, overwrite=True) as tmp:
            write_tiny_hovle(tmp, seed=0)
            (tmp / ".complete").write_text(TINY_HOVLE_VERSION)
    return out
