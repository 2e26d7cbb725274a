"""mmdistill: distil decoder-only (multimodal) transformers into Mamba-2 and hybrid students.

Top-level API::

    teacher = mmdistill.load_teacher("path/or/alias")
    student = mmdistill.seed(teacher, attention_layers="every:4")
    student.save_pretrained("student/")
    student = mmdistill.load_student("student/")
"""

from __future__ import annotations

from .checkpoint import save_pretrained
from .generation import generate
from .lm_config import LMConfig
from .model import DecoderLM, load_student
from .seeding import seed
from .teachers import load_teacher
from .version import __version__

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
