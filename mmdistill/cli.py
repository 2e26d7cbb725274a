"""The ``mmdistill`` command line: thin typed commands over library calls.

Progress and tables go to stderr (rich); ``--json`` prints exactly one JSON document on stdout,
on a failure too. Exit codes: :data:`mmdistill.errors.EXIT_CODES` (0 success, 1 a bug with its
traceback, 2 bad input, 3 training stopped, 4 quality gates failed, 5 out of resources, 130
interrupted).
"""

from __future__ import annotations

import sys

import torch
import typer

from .commands import (
    bench_cmd,
    demo_cmd,
    eval_cmd,
    export_cmd,
    generate_cmd,
    layout_cmd,
    run_cmd,
    seed_cmd,
)
from .commands.output import emit_json, err
from .errors import MmdistillError, ResourceError
from .version import __version__

# click's exception classes as typer raises them (recent typer versions vendor click)
_ClickException = sys.modules[typer.BadParameter.__module__].ClickException

app = typer.Typer(
    name="mmdistill",
    help="Distil decoder-only (multimodal) transformers into Mamba-2 and hybrid students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: readable at 80 columns (rich panels were not)
    add_completion=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    """Distil decoder-only (multimodal) transformers into Mamba-2 and hybrid students."""
    if version:
        typer.echo(__version__)
        raise typer.Exit()


for _module in (
    seed_cmd,
    run_cmd,
    eval_cmd,
    export_cmd,
    generate_cmd,
    bench_cmd,
    demo_cmd,
    layout_cmd,
):
    _module.register(app)


def main() -> None:
    """Console entry point. A failure the user (or the machine) caused prints one ``error:``
    line and a ``hint:`` line on stderr and, with ``--json``, one document on stdout:
    ``{"status": "error", "exit_code", "error": {"type", "message", "hint"}, "completed"}``."""
    try:
        code = app(standalone_mode=False)
    except MmdistillError as exc:
        _fail(exc.exit_code, type(exc).__name__, str(exc), exc.hint, exc.completed)
    except _ClickException as exc:  # a usage error: click prints the usage and the message
        exc.show()
        ctx = getattr(exc, "ctx", None)
        hint = f"see '{ctx.command_path if ctx else 'mmdistill'} --help'"
        _fail(exc.exit_code, "UsageError", exc.format_message(), hint, shown=True)
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except torch.OutOfMemoryError as exc:
        message = f"out of memory: {str(exc).splitlines()[0]}"
        _fail(5, "OutOfMemoryError", message, ResourceError.default_hint)
    if code == 130:
        err.print("[yellow]interrupted[/]")
    sys.exit(code or 0)


def _fail(
    code: int,
    kind: str,
    message: str,
    hint: str,
    completed: dict | None = None,
    shown: bool = False,
) -> None:
    """Report a failure (stderr, unless ``shown`` already; the ``--json`` document) and exit."""
    if not shown:
        err.print(f"[bold red]error:[/] {message}", highlight=False)
    err.print(f"[dim]hint:[/] {hint}", highlight=False)
    if "--json" in sys.argv[1:]:
        error = {"type": kind, "message": message, "hint": hint}
        document = {"status": "error", "exit_code": code, "error": error}
        emit_json({**document, "completed": completed or {}})
    sys.exit(code)


if __name__ == "__main__":
    main()
