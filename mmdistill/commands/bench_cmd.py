"""``mmdistill bench``: prefill latency, decode latency/throughput and peak memory of a teacher
and its students at long contexts (what is timed: :mod:`mmdistill.bench`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .. import bench, bench_reference, bench_t2i
from ..bench import format_bytes, format_ms, format_seconds, human_count
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
    task: str = typer.Option(
        "text",
        "--task",
        help="text: prefill and decode of text; t2i: images/s of text-to-image generation after "
        "a shared context, each model given an image vocabulary (docs/benchmarks.md).",
    ),
    lengths: str | None = typer.Option(
        None,
        "--lengths",
        "-l",
        help="Context lengths, e.g. 1k,4k,16k,64k,103k,128k (default 1k,4k,16k; t2i 1k,16k,100k).",
    ),
    decode_tokens: int | None = typer.Option(
        None, "--decode-tokens", "-n", help="Text: decode steps timed (default 32)."
    ),
    batch: str | None = typer.Option(
        None, "--batch", "-b", help="Text: batch size(s), comma list (default 1)."
    ),
    prefill_batch: int | None = typer.Option(
        None,
        "--prefill-batch",
        help="Text: prefill this many rows and replicate the cache to the batch (identical "
        "prompts).",
    ),
    prefill_chunk: int = typer.Option(
        8192, "--prefill-chunk", help="All-Mamba students' prefill chunk in tokens (0: one pass)."
    ),
    hybrid_chunk: int = typer.Option(
        8192,
        "--hybrid-prefill-chunk",
        help="Prefill chunk of students with attention layers in tokens (0: one pass).",
    ),
    teacher_chunk: int = typer.Option(
        0, "--teacher-prefill-chunk", help="Teacher's prefill chunk in tokens (0: one pass)."
    ),
    static_cache: bool = typer.Option(
        True,
        "--static-cache/--no-static-cache",
        help="Text: add rows with a static (preallocated) KV cache for the teacher and for each "
        "student with attention layers (eager, and on CUDA replayed from a graph).",
    ),
    cuda_graph: bool = typer.Option(
        True,
        "--cuda-graph/--no-cuda-graph",
        help="Decode all-Mamba students from a captured CUDA graph, and add graph rows for "
        "models with attention on a static KV cache (t2i: every model; CUDA only).",
    ),
    compile_step: bool = typer.Option(
        False, "--compile", help="torch.compile the graph-captured decode step first."
    ),
    lora: str = typer.Option(
        "merged",
        "--lora",
        help="t2i: the students' task LoRA adapters merged into their weights (as served) or "
        "kept as adapters.",
    ),
    grid: int = typer.Option(16, "--grid", help="t2i: codes per image side (16: 256 codes)."),
    codebook: int = typer.Option(16384, "--codebook", help="t2i: codes in the image codebook."),
    max_batch: int = typer.Option(4096, "--max-batch", help="t2i: largest batch searched."),
    min_gain: float = typer.Option(
        0.05,
        "--min-gain",
        help="t2i: stop doubling the batch once images/s rises by less than this fraction.",
    ),
    skip_teacher: bool = typer.Option(False, "--skip-teacher", help="Measure students only."),
    transformers_teacher: bool = typer.Option(
        True,
        "--transformers-teacher/--no-transformers-teacher",
        help="Text: also run the teacher as users do, through transformers' own class (a "
        "random shape: the LlamaForCausalLM of its sizes), growing and static KV cache.",
    ),
    device: str = typer.Option("auto", help="cuda, cpu or auto."),
    dtype: str = typer.Option("bfloat16", help=DTYPE_HELP),
    seed: int = typer.Option(0, help="Seed for random weights and prompts."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    plot_path: Path | None = typer.Option(None, "--plot", help="Text: write a PNG plot here."),
) -> None:
    """Time prefill and decode of a teacher and its students at each context length (--task
    text), or their text-to-image generation after a shared context (--task t2i)."""
    import torch

    check_dtype(dtype)
    if task not in TASKS:
        raise typer.BadParameter(f"one of {', '.join(TASKS)}", param_hint="--task")
    if task == "t2i":
        _refuse_text_options(batch, decode_tokens, prefill_batch, plot_path)
        if lora not in bench_t2i.LORA_MODES:
            raise typer.BadParameter(f"one of {', '.join(bench_t2i.LORA_MODES)}", "--lora")
    length_list = _counts(lengths or DEFAULT_LENGTHS[task], "--lengths")
    batch_list = _counts(batch or "1", "--batch")
    if (teacher is None) == (random_shape is None):
        raise MmdistillError("give exactly one of --teacher SRC and --random-shape NAME")
    if skip_teacher and not student and not seed_layout:
        raise MmdistillError(
            "nothing to measure: give a student (--student DIR or --seed-layout SPEC) or drop "
            "--skip-teacher"
        )
    dev = resolve_device(device)
    sources = (teacher, random_shape, student, seed_layout)
    teacher_model, label, students = _load_models(sources, dev, getattr(torch, dtype), seed, task)
    options = bench.RowOptions(
        static_cache=static_cache,
        cuda_graph=cuda_graph and dev.type == "cuda",
        compile=compile_step,
        teacher_chunk=teacher_chunk or None,
        hybrid_chunk=hybrid_chunk or None,
        linear_chunk=prefill_chunk or None,
    )
    teacher_row = None if skip_teacher else teacher_model
    if task == "t2i":
        settings = bench_t2i.T2ISettings(
            lengths=length_list,
            grid=grid,
            codebook_size=codebook,
            lora=lora,
            max_batch=max_batch,
            min_gain=min_gain,
            seed=seed,
        )
        document = _run_t2i(teacher_row, students, options, settings, dev)
    else:
        settings = bench.BenchSettings(
            lengths=length_list,
            batches=batch_list,
            decode_tokens=32 if decode_tokens is None else decode_tokens,
            prefill_batch=prefill_batch,
            seed=seed,
        )
        reference = None
        if teacher_row is not None and transformers_teacher:
            with err.status("building transformers' model of the teacher"):
                where = "cpu" if dev.type == "cuda" else dev  # waits there, as the others
                reference = bench_reference.reference_model(
                    teacher_model, where, getattr(torch, dtype)
                )
            if reference is None:
                err.print("no transformers row: transformers has no text class for this teacher")
        document = _run_text(teacher_row, students, options, settings, dev, reference)
    document["teacher"] = label
    document["dtype"] = dtype
    if task == "t2i":
        for table in (t2i_table(document), t2i_ratio_table(document)):
            err.print(table, width=max(err.width, 80))
    else:
        err.print(results_table(document))
    if plot_path is not None:
        bench.plot(document, plot_path)
        err.print(f"plot written to {plot_path}")
    if as_json:
        emit_json(document)


TASKS = ("text", "t2i")
DEFAULT_LENGTHS = {"text": "1k,4k,16k", "t2i": "1k,16k,100k"}


def _counts(text: str, hint: str) -> list[int]:
    try:
        counts = bench.parse_counts(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=hint) from exc
    if not counts:
        raise typer.BadParameter("give at least one", param_hint=hint)
    return counts


def _refuse_text_options(batch, decode_tokens, prefill_batch, plot_path) -> None:
    given = [
        name
        for name, value in (
            ("--batch", batch),
            ("--decode-tokens", decode_tokens),
            ("--prefill-batch", prefill_batch),
            ("--plot", plot_path),
        )
        if value is not None
    ]
    if given:
        raise typer.BadParameter(
            f"{', '.join(given)}: text only; --task t2i decodes whole images and searches batch "
            "sizes (--max-batch, --min-gain)",
            param_hint="--task",
        )


def _load_models(sources, dev, torch_dtype, seed: int, task: str):
    """(teacher, its label, [(name, student)]); on a GPU every model waits on the CPU."""
    import torch

    teacher, random_shape, student_dirs, seed_layouts = sources
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
        students = [
            (Path(d).name or str(d), load_student(d, dtype=torch_dtype)) for d in student_dirs
        ]
        for spec in seed_layouts:
            seeded = seed_fn(teacher_model, attention_layers=spec, seed=seed)
            students.append((_seeded_name(spec, task), seeded.to("cpu") if on_gpu else seeded))
        if on_gpu:
            teacher_model.to("cpu")
            torch.cuda.empty_cache()
    return teacher_model, label, students


def _seeded_name(spec: str, task: str) -> str:
    """``seeded:SPEC`` (text); ``linear`` or ``hybrid SPEC`` (t2i, where the table is narrow)."""
    if task == "text":
        return f"seeded:{spec}"
    return "linear" if spec == "none" else f"hybrid {spec}"


def _run_text(teacher, students, options, settings, dev, reference=None) -> dict:
    candidates = bench.candidates_for(teacher, students, options, err.print, reference)
    with err.status("benchmarking") as status:
        return bench.run_bench(
            candidates, settings, dev, offload=dev.type == "cuda", progress=status.update
        )


def _run_t2i(teacher, students, options, settings, dev) -> dict:
    with err.status("adding image vocabularies"):
        candidates = bench_t2i.t2i_candidates(teacher, students, settings, options)
    with err.status("benchmarking") as status:
        return bench_t2i.run_t2i_bench(
            candidates, settings, dev, offload=dev.type == "cuda", progress=status.update
        )


def results_table(document: dict) -> Group:
    """One table per model (each fits 80 columns), with each student's ratios against the
    growing-cache teacher (``x prefill``, ``x decode``: speed-ups; ``memory``: peak saved)."""
    timer = "CUDA events" if document["device"]["type"] == "cuda" else "wall clock"
    ratio = {
        (r["student"], r["length"], r["batch"]): r
        for r in document["ratios"]
        if r["teacher"] == "teacher"
    }
    tables = []
    for model in dict.fromkeys(row["model"] for row in document["results"]):
        table = Table(title=model, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
        columns = ("ctx", "batch", "prefill", "ms/tok", "tok/s", "peak GiB")
        for column in (*columns, "x prefill", "x decode", "memory"):
            table.add_column(column, justify="right")
        for row in (r for r in document["results"] if r["model"] == model):
            table.add_row(*_result_cells(row, ratio.get((model, row["length"], row["batch"]))))
        tables.append(table)
    title = (
        f"mmdistill bench on {document['device']['name']} ({timer}); prefill in s, decode in "
        "ms per token"
    )
    return Group(Text(title, style="bold"), *tables)


def _result_cells(row: dict, r: dict | None) -> list[str]:
    cells = [human_count(row["length"]), str(row["batch"])]
    if row["status"] != "ok":
        return [*cells, row["status"].upper(), *[""] * 6]
    tps = row["decode_tokens_per_s"]
    cells += [
        format_seconds(row["prefill_ms"]),
        format_ms(row["decode_ms_per_token"]),
        "-" if tps is None else f"{tps:,.0f}",
        format_bytes(row["peak_memory_bytes"]),
    ]
    if r is None:
        return [*cells, "", "", ""]
    saved = "" if r["memory_saving"] is None else f"-{100 * r['memory_saving']:.1f}%"
    return [*cells, _times(r["prefill_speedup"]), _times(r["decode_speedup"]), saved]


def t2i_table(document: dict) -> Table:
    """Whole-image rows of a t2i document, readable at 80 columns: seconds of prefill and decode,
    milliseconds of the cache copy, images/s and peak GiB."""
    timer = "CUDA events" if document["device"]["type"] == "cuda" else "wall clock"
    table = Table(
        title=f"t2i on {document['device']['name']} ({timer})", box=box.SIMPLE_HEAD, padding=(0, 1)
    )
    for column in ("model", "ctx", "batch", "prefill s", "copy ms", "decode s", "img/s", "GiB"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in document["results"]:
        if row["kind"] != "full":
            continue
        cells = [row["model"], human_count(row["length"]), str(row["batch"])]
        if row["status"] != "ok":
            table.add_row(*cells, row["status"].upper(), *[""] * 4)
            continue
        table.add_row(
            *cells,
            f"{row['prefill_ms'] / 1e3:.2f}",
            format_ms(row["replicate_ms"]),
            f"{row['decode_ms'] / 1e3:.2f}",
            f"{row['images_per_s']:.3g}",
            format_bytes(row["peak_memory_bytes"]),
        )
    return table


def t2i_ratio_table(document: dict) -> Table:
    """Each student's images/s over the attention model's, at batch 1 and each at its best
    batch, and the peak memory saved at the best batches."""
    table = Table(title="images/s vs the attention model", box=box.SIMPLE_HEAD, padding=(0, 1))
    for column in ("student", "ctx", "batch 1", "best", "batches", "memory"):
        table.add_column(column, justify="left" if column == "student" else "right")
    ratios = {(r["student"], r["teacher"], r["length"], r["at"]): r for r in document["ratios"]}
    for (student, teacher, length, at), best in ratios.items():
        if at != "best":
            continue
        one = ratios.get((student, teacher, length, "batch 1"))
        saving = best["memory_saving"]
        table.add_row(
            student,
            human_count(length),
            _times(one["images_per_s_ratio"]) if one else "",
            _times(best["images_per_s_ratio"]),
            f"{best['student_batch']} vs {best['teacher_batch']}",
            "" if saving is None else f"{-100 * saving:+.1f}%",
        )
    return table


def _times(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
