"""The ``mmdistill`` command line: thin typed commands over library calls.

Progress and tables go to stderr (rich); ``--json`` prints exactly one JSON document on stdout.
Exit codes: 0 success, 1 unexpected error (a bug: traceback shown), 2 user error (bad input,
missing files, unsupported model), 3 training stopped (e.g. non-finite loss; last good
checkpoint kept), 130 interrupted.
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

from .errors import MmdistillError

app = typer.Typer(
    name="mmdistill",
    help="Distil decoder-only (multimodal) transformers into Mamba-2 and hybrid students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


def emit_json(document: dict) -> None:
    """Print the single JSON document of a ``--json`` run on stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    """Distil decoder-only (multimodal) transformers into Mamba-2 and hybrid students."""
    if version:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit()


def _register() -> None:
    from .commands import bench_cmd, demo_cmd, eval_cmd, generate_cmd, run_cmd, seed_cmd

    for module in (seed_cmd, run_cmd, eval_cmd, generate_cmd, bench_cmd, demo_cmd):
        module.register(app)


_register()


def main() -> None:
    """Console entry point: usage errors exit 2 (click), user errors print one line."""
    try:
        app()
    except MmdistillError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
