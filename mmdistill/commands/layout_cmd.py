"""``mmdistill layout``: which layers should keep attention, by measurement.

Scores every layer of a linear student by the KL to the teacher when that layer alone is
restored (:mod:`mmdistill.layer_scores`, :mod:`mmdistill.evaluation.layout`), prints the
ranking, and with ``--budget K`` the layers ``--attention-layers auto:K`` would keep.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..attention_layers import auto_budget
from ..errors import RecipeError
from ..evaluation import load_model, tokenizer_for
from ..evaluation.layout import measure_layout
from ..layer_scores import SEARCHES
from .options import DEVICE_HELP, require_files, resolve_device
from .output import emit_json, err


def layout_command(
    teacher: str = typer.Option(..., "--teacher", "-t", help="Teacher source."),
    data: list[Path] = typer.Option(..., "--data", "-d", help="Calibration .txt/.jsonl files."),
    budget: str | None = typer.Option(
        None, "--budget", "-k", help="Layers to keep: K or P% (as auto:K / auto:P%)."
    ),
    student: Path | None = typer.Option(
        None, "--student", help="A linear student after the layer-wise stages (default: seeded)."
    ),
    max_tokens: int = typer.Option(8192, help="Scored tokens per file."),
    seq_len: int = typer.Option(512, help="Window length for documents."),
    batch_size: int = typer.Option(4, help="Sequences per forward."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    search: str = typer.Option(
        "top",
        "--search",
        help="top: the K layers of largest gain; greedy: one layer at a time, each round "
        "scored with the earlier picks restored (K rounds; needs --budget).",
    ),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write a PNG of gain per layer."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Rank the layers by how much of the gap to the teacher each one's attention closes."""
    require_files(data, "--data")
    if search not in SEARCHES:
        raise RecipeError(f"--search must be one of {', '.join(SEARCHES)}; got {search!r}")
    if search == "greedy" and budget is None:
        raise RecipeError(f"--search {search} needs --budget K")
    where = resolve_device(device)
    with err.status("loading the teacher"):
        reference = load_model(teacher, dtype="float32", device=where)
    k = None
    if budget is not None:
        spec = f"auto:{budget}"
        try:
            k = auto_budget(spec, reference.config.num_layers)
        except ValueError as exc:
            raise RecipeError(f"--budget: {exc}") from exc
    linear = load_model(student, dtype="float32", device=where) if student else None
    if linear is not None and "attention" in linear.config.layer_types:
        raise RecipeError(f"--student {student} keeps attention layers; give a linear student")
    with err.status(f"scoring {reference.config.num_layers} layers"):
        result = measure_layout(
            reference,
            data,
            tokenizer_for(reference),
            linear,
            k,
            max_tokens,
            seq_len,
            batch_size,
            search,
        )
    err.print(_table(result))
    if plot_path is not None:
        _plot(result, plot_path)
        err.print(f"plot written to {plot_path}")
    if as_json:
        emit_json(result)


def _table(result: dict) -> Table:
    scores = result["scores"]
    chosen = set(result["chosen"] or [])
    title = (
        f"layers by gain alone ({result['student']}; linear KL {scores['linear_kl']:.4g}, "
        f"{result['tokens']:,} tokens)"
    )
    if "order" in result:
        title += f"; greedy picks, in order: {', '.join(map(str, result['order']))}"
    table = Table(title=title)
    errors, clear = scores["gain_errors"], set(scores["clear"])
    for column in ("rank", "layer", "KL restored", "gain", "± s.e.", "clear", "kept"):
        table.add_column(column, justify="right")
    for rank, layer in enumerate(scores["ranking"], 1):
        table.add_row(
            str(rank),
            str(layer),
            f"{scores['restored_kl'][layer]:.4g}",
            f"{scores['gains'][layer]:.4g}",
            f"{errors[layer]:.2g}" if errors else "-",
            "yes" if layer in clear else "",
            "yes" if layer in chosen else "",
        )
    return table


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = result["scores"]["gains"]
    chosen = set(result["chosen"] or [])
    fig, ax = plt.subplots(figsize=(max(6, len(gains) * 0.25), 3.2))
    colours = ["tab:orange" if i in chosen else "tab:blue" for i in range(len(gains))]
    ax.bar(range(len(gains)), gains, color=colours)
    ax.set_xlabel("layer")
    ax.set_ylabel("KL gain when restored")
    ax.set_title("attention kept (orange)" if chosen else "gain per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    app.command("layout")(layout_command)
