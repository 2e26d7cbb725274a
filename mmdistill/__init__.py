"""mmdistill: distil decoder-only (multimodal) transformers into Mamba-2 and hybrid students.

Top-level API::

    teacher = mmdistill.load_teacher("path/or/alias")
    student = mmdistill.seed(teacher, attention_layers="every:4")
    student.save_pretrained("student/")
    student = mmdistill.load_student("student/")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import load_student, save_pretrained  # noqa: E402
from .generation import generate  # noqa: E402
from .model import DecoderLM, LMConfig  # noqa: E402
from .seeding import seed  # noqa: E402
from .teachers import load_teacher  # noqa: E402

__all__ = [
    "DecoderLM",
    "LMConfig",
    "__version__",
    "generate",
    "load_student",
    "load_teacher",
    "save_pretrained",
    "seed",
]
