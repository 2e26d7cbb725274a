"""The ``mmdistill`` command line: thin typed commands over library calls.

Progress and tables go to stderr (rich); ``--json`` prints exactly one JSON document on stdout.
Exit codes: 0 success, 1 unexpected error (a bug: traceback shown), 2 user error (bad input,
missing files, unsupported model), 3 training stopped (e.g. non-finite loss; last good
checkpoint kept), 130 interrupted.
"""

from __future__ import annotations

import sys

import typer

from .commands import bench_cmd, demo_cmd, eval_cmd, generate_cmd, run_cmd, seed_cmd
from .commands.output import emit_json, err
from .errors import MmdistillError
from .version import __version__

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


for _module in (seed_cmd, run_cmd, eval_cmd, generate_cmd, bench_cmd, demo_cmd):
    _module.register(app)


def main() -> None:
    """Console entry point: usage errors exit 2 (click), user errors print one line (and, with
    ``--json``, one JSON document on stdout: ``{"status": "error", "exit_code", "error": {"type",
    "message"}, "completed": {...}}``)."""
    try:
        app()
    except MmdistillError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        if "--json" in sys.argv[1:]:
            emit_json(
                {
                    "status": "error",
                    "exit_code": exc.exit_code,
                    "error": {"type": type(exc).__name__, "message": str(exc)},
                    "completed": exc.completed,
                }
            )
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # outside a command (typer turns one inside into exit 130)
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # Ctrl-C inside a command
            err.print("[yellow]interrupted[/]")
        raise


if __name__ == "__main__":
    main()
