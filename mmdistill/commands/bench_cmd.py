"""``mmdistill bench``: prefill latency, decode latency/throughput and peak memory of a teacher
and its students at long contexts (what is timed: :mod:`mmdistill.bench`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .. import bench
from ..bench import format_bytes, format_ms, human_count
from ..errors import MmdistillError
from ..model import load_student
from ..seeding import seed as seed_fn
from ..teachers import load_teacher
from .options import DTYPE_HELP, check_dtype, resolve_device
from .output import emit_json, err


def bench_command(
    student: list[str] = typer.Option(
        [], "--student", "-s", help="Student checkpoint directory (repeatable)."
    ),
    teacher: str | None = typer.Option(
        None, "--teacher", "-t", help="Teacher source: alias, model directory, .gguf or hub id."
    ),
    random_shape: str | None = typer.Option(
        None,
        "--random-shape",
        help="Instead of --teacher: a random-weight teacher of this shape built on the device "
        "(hovle-2.6b, tiny).",
    ),
    seed_layout: list[str] = typer.Option(
        [],
        "--seed-layout",
        help="Also seed a student from the teacher in-process, keeping attention at these "
        "layers (repeatable: none, every:4, ...).",
    ),
    lengths: str = typer.Option(
        "1k,4k,16k", "--lengths", "-l", help="Context lengths, e.g. 1k,4k,16k,64k,103k,128k."
    ),
    decode_tokens: int = typer.Option(32, "--decode-tokens", "-n", help="Decode steps timed."),
    batch: str = typer.Option("1", "--batch", "-b", help="Batch size(s), comma list."),
    prefill_batch: int | None = typer.Option(
        None,
        "--prefill-batch",
        help="Prefill this many rows and replicate the cache to the batch (identical prompts).",
    ),
    prefill_chunk: int = typer.Option(
        8192, "--prefill-chunk", help="All-Mamba students' prefill chunk in tokens (0: one pass)."
    ),
    hybrid_chunk: int = typer.Option(
        0,
        "--hybrid-prefill-chunk",
        help="Prefill chunk of students with attention layers (0: one pass). A chunk after the "
        "first gives their attention an explicit mask, which SDPA runs without a fused GQA kernel.",
    ),
    teacher_chunk: int = typer.Option(
        0, "--teacher-prefill-chunk", help="Teacher's prefill chunk in tokens (0: one pass)."
    ),
    static_cache: bool = typer.Option(
        True,
        "--static-cache/--no-static-cache",
        help="Add rows with a static (preallocated) KV cache for the teacher and for each "
        "student with attention layers (eager, and on CUDA replayed from a graph).",
    ),
    cuda_graph: bool = typer.Option(
        True,
        "--cuda-graph/--no-cuda-graph",
        help="Decode all-Mamba students from a captured CUDA graph, and add graph rows for "
        "models with attention on a static KV cache (CUDA only).",
    ),
    compile_step: bool = typer.Option(
        False, "--compile", help="torch.compile the graph-captured decode step first."
    ),
    skip_teacher: bool = typer.Option(False, "--skip-teacher", help="Measure students only."),
    device: str = typer.Option("auto", help="cuda, cpu or auto."),
    dtype: str = typer.Option("bfloat16", help=DTYPE_HELP),
    seed: int = typer.Option(0, help="Seed for random weights and prompts."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write a PNG plot here."),
) -> None:
    """Time prefill and decode of a teacher and its students at each context length."""
    import torch

    check_dtype(dtype)
    try:
        length_list = bench.parse_counts(lengths)
        batch_list = bench.parse_counts(batch)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not length_list or not batch_list:
        raise typer.BadParameter("give at least one length and one batch size")
    if (teacher is None) == (random_shape is None):
        raise MmdistillError("give exactly one of --teacher SRC and --random-shape NAME")
    if skip_teacher and not student and not seed_layout:
        raise MmdistillError(
            "nothing to measure: give a student (--student DIR or --seed-layout SPEC) or drop "
            "--skip-teacher"
        )
    dev = resolve_device(device)
    torch_dtype = getattr(torch, dtype)
    on_gpu = dev.type == "cuda"

    with err.status("loading models"):
        if random_shape is not None:
            try:
                teacher_model = bench.random_model(random_shape, dev, torch_dtype, seed=seed)
            except ValueError as exc:
                raise MmdistillError(str(exc)) from exc
            label = f"random:{random_shape}"
        else:
            teacher_model = load_teacher(teacher, dtype=torch_dtype, device="cpu")
            label = teacher
        students = [(Path(d).name or str(d), load_student(d, dtype=torch_dtype)) for d in student]
        for spec in seed_layout:
            seeded = seed_fn(teacher_model, attention_layers=spec, seed=seed)
            students.append((f"seeded:{spec}", seeded.to("cpu") if on_gpu else seeded))
        if on_gpu:
            teacher_model.to("cpu")
            torch.cuda.empty_cache()

    options = bench.RowOptions(
        static_cache=static_cache,
        cuda_graph=cuda_graph and on_gpu,
        compile=compile_step,
        teacher_chunk=teacher_chunk or None,
        hybrid_chunk=hybrid_chunk or None,
        linear_chunk=prefill_chunk or None,
    )
    candidates = bench.candidates_for(
        None if skip_teacher else teacher_model, students, options, note=err.print
    )
    settings = bench.BenchSettings(
        lengths=length_list,
        batches=batch_list,
        decode_tokens=decode_tokens,
        prefill_batch=prefill_batch,
        seed=seed,
    )
    with err.status("benchmarking") as status:
        document = bench.run_bench(
            candidates, settings, dev, offload=on_gpu, progress=status.update
        )
    document["teacher"] = label
    document["dtype"] = dtype
    err.print(results_table(document), width=max(err.width, 150))
    if plot_path is not None:
        bench.plot(document, plot_path)
        err.print(f"plot written to {plot_path}")
    if as_json:
        emit_json(document)


def results_table(document: dict) -> Table:
    """Rich table of the rows, with each student's ratios against the growing-cache teacher."""
    timer = "CUDA events" if document["device"]["type"] == "cuda" else "wall clock"
    table = Table(title=f"mmdistill bench on {document['device']['name']} ({timer})")
    for column in (
        "model",
        "length",
        "batch",
        "prefill ms",
        "decode ms/tok",
        "tok/s",
        "peak GiB",
        "vs teacher: prefill",
        "decode",
        "memory",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    ratio = {
        (r["student"], r["length"], r["batch"]): r
        for r in document["ratios"]
        if r["teacher"] == "teacher"
    }
    for row in document["results"]:
        cells = [row["model"], human_count(row["length"]), str(row["batch"])]
        if row["status"] != "ok":
            table.add_row(*cells, row["status"].upper(), *[""] * 6)
            continue
        tps = row["decode_tokens_per_s"]
        cells += [
            format_ms(row["prefill_ms"]),
            format_ms(row["decode_ms_per_token"]),
            "-" if tps is None else f"{tps:,.0f}",
            format_bytes(row["peak_memory_bytes"]),
        ]
        r = ratio.get((row["model"], row["length"], row["batch"]))
        if r is None:
            cells += ["", "", ""]
        else:
            cells += [
                _times(r["prefill_speedup"]),
                _times(r["decode_speedup"]),
                "" if r["memory_saving"] is None else f"-{100 * r['memory_saving']:.1f}%",
            ]
        table.add_row(*cells)
    return table


def _times(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
