"""Where commands write: rich tables and progress on stderr, one JSON document on stdout."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from rich.console import Console

err = Console(stderr=True)
"""The console every command prints its tables, progress and messages to."""


def emit_json(document: dict) -> None:
    """Print the single JSON document of a ``--json`` run on stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout (Python or native code) to stderr for a while, so that
    libraries that print (DeepSpeed does) cannot corrupt the ``--json`` document."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
