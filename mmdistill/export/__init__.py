"""Serving export: students as stock ``GraniteMoeHybridForCausalLM`` folders (docs/export.md).

:mod:`.granite` (what exports and the mapping), :mod:`.hf_folder` (writing the folder),
:mod:`.check` (the export under stock transformers against the student).
"""

from .check import check_export
from .granite import ARCHITECTURE, export_blockers, export_verdict
from .hf_folder import (
    STOCK_TRANSFORMERS_MIN,
    ExportError,
    check_exportable,
    check_stock_transformers,
    export_student,
    load_export,
)

__all__ = [
    "ARCHITECTURE",
    "ExportError",
    "STOCK_TRANSFORMERS_MIN",
    "check_export",
    "check_exportable",
    "check_stock_transformers",
    "export_blockers",
    "export_student",
    "export_verdict",
    "load_export",
]
