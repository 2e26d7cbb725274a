"""Teacher adapters and loading. Importing this package registers every built-in adapter."""

from . import gemma, hf, hovle, llava  # noqa: F401 - registers the built-in adapters and front-ends
from .base import ADAPTERS, Rule, TeacherAdapter, apply_rules, find_adapter, register_adapter
from .loading import load_teacher, resolve_source, teacher_config

__all__ = [
    "ADAPTERS",
    "Rule",
    "TeacherAdapter",
    "apply_rules",
    "find_adapter",
    "load_teacher",
    "register_adapter",
    "resolve_source",
    "teacher_config",
]
