"""Long-context speed and memory of a teacher and its students (``mmdistill bench``).

What is timed is the same for every model, context length ``L`` and batch ``B``:

* **prefill** -- a fresh cache, then the ``L`` prompt tokens of each row through the model
  (embedding, every layer, final norm, and the LM head on the last position only) until the
  last position's logits are ready. Teachers take the prompt in one pass (the way users run
  them); students in chunks of ``prefill_chunk`` tokens so activation memory stays bounded.
* **decode** -- ``N`` greedy steps after the prefill: each step feeds one token per row through
  the model with the cache and takes the argmax of the logits. Per-token latency is the time of
  the ``N`` steps over ``N``; throughput is ``B * N`` over that time. With ``cuda_graph`` the
  step is replayed from a captured CUDA graph: all-Mamba students reuse one graph per batch;
  models with attention layers need a static KV cache (``kv_cache="static"``) and capture one
  per length, sized for it. Otherwise the step runs eagerly.
* **peak memory** -- ``torch.cuda.max_memory_allocated`` over the row (weights, cache, prefill
  and decode activations, the captured graph's pool), after resetting the peak.

Each model is warmed up before its first timed row (kernel compilation and autotuning stay
out). On CUDA, time comes from CUDA events around each phase; on CPU from the wall clock.
With ``prefill_batch`` smaller than ``B``, the prompt is prefilled for ``prefill_batch`` rows and
the cache replicated to ``B`` rows (identical prompts: same cache size and decode work as ``B``
different prompts); the prefill time is then that of ``prefill_batch`` rows.

A row that runs out of memory is recorded with ``status: "oom"`` and the run goes on; rows of
the same model at a larger length and batch are then recorded as ``"skipped"``.
"""

from __future__ import annotations

import datetime
import gc
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bench_reference import build_on, measure_reference
from .cached_forward import prefill
from .graph_decode import GraphDecoder
from .model import DecoderLM, LMCache
from .shapes import SHAPES, text_config
from .timing import Timer

SCHEMA = "mmdistill.bench/1"


def random_model(
    shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0
) -> DecoderLM:
    """A random-weight teacher of a registered shape, initialised directly on ``device``.

    Raises:
        ValueError: for an unknown shape (naming the known ones).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown random shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    config = text_config(SHAPES[shape])
    device = torch.device(device)
    model = build_on(lambda: DecoderLM(config), device, dtype, seed)
    for rotary in model.rotary:  # RoPE frequencies stay float32
        rotary.reset_frequencies(device)
    model.requires_grad_(False)
    return model.eval()


@dataclass
class Candidate:
    """One row group of the table: a model and how it is run.

    Attributes:
        name: label in the table and JSON (e.g. ``"teacher"``, ``"linear"``).
        role: ``"teacher"`` or ``"student"``.
        model: the model (moved to the bench device while it is measured).
        kv_cache: ``"growing"``, ``"static"`` (preallocated to ``L + N``) or ``"none"``.
        prefill_chunk: prefill chunk length in tokens, ``None`` for one pass.
        cuda_graph: decode by replaying a captured CUDA graph (with attention layers: only with
            a static KV cache).
        compile: ``torch.compile`` the decode step before capturing it.
        backend: ``"mmdistill"`` (our model) or ``"transformers"`` (transformers' own class,
            :mod:`mmdistill.bench_reference`; eager, one-pass prefill).
    """

    name: str
    role: str
    model: DecoderLM
    kv_cache: str = "growing"
    prefill_chunk: int | None = None
    cuda_graph: bool = False
    compile: bool = False
    backend: str = "mmdistill"

    def __post_init__(self) -> None:
        if self.backend == "transformers":
            return
        attention = any(t != "mamba" for t in self.model.config.layer_types)
        if self.cuda_graph and attention and self.kv_cache != "static":
            raise ValueError(
                f"{self.name}: a model with attention layers replays a CUDA graph only with a "
                "static KV cache"
            )

    def describe(self) -> dict:
        """JSON description of the candidate (no weights)."""
        model = self.model
        if self.backend == "transformers":
            layers = model.config.num_hidden_layers
            types = ["attention"] * layers
        else:
            types = model.config.layer_types
        return {
            "name": self.name,
            "role": self.role,
            "layers": len(types),
            "attention_layers": [i for i, t in enumerate(types) if t == "attention"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv_cache": self.kv_cache,
            "prefill_chunk": self.prefill_chunk,
            "cuda_graph": self.cuda_graph,
            "compile": self.compile,
            "backend": self.backend,
            "class": type(model).__name__,
        }


@dataclass
class RowOptions:
    """Which rows each model gets (see :func:`candidates_for`).

    Attributes:
        static_cache: add rows with a preallocated KV cache for models with attention layers.
        cuda_graph: replay decode steps from a CUDA graph (all-Mamba students; with a static KV
            cache, models with attention too).
        compile: ``torch.compile`` the graph-captured step first.
        teacher_chunk, hybrid_chunk, linear_chunk: prefill chunk of the teacher, of students
            with attention layers, and of all-Mamba students (``None``: one pass).
    """

    static_cache: bool = True
    cuda_graph: bool = False
    compile: bool = False
    teacher_chunk: int | None = None
    hybrid_chunk: int | None = 8192
    linear_chunk: int | None = 8192


def candidates_for(
    teacher: DecoderLM | None,
    students: list[tuple[str, DecoderLM]],
    options: RowOptions,
    note: Callable[[str], None] | None = None,
    reference=None,
) -> list[Candidate]:
    """The rows of a run: the teacher's (unless ``None``), then transformers' own model of it
    (``reference``, :mod:`mmdistill.bench_reference`: growing and, with ``static_cache``,
    static KV cache), then each student's.

    A model with attention layers gets a row with the standard growing KV cache (as its users
    run it) and, with ``static_cache``, one with a preallocated cache, eager and (with
    ``cuda_graph``) replayed from a graph; an all-Mamba student gets one row. ``note`` is told
    about rows left out (no graph for sliding-window attention).
    """

    def attention_rows(name: str, role: str, model: DecoderLM, chunk: int | None) -> list:
        rows = [Candidate(name, role, model, "growing", chunk)]
        if not options.static_cache:
            return rows
        rows.append(Candidate(f"{name} (static KV)", role, model, "static", chunk))
        windowed = any(stack.sliding_window is not None for stack in model.config.stacks)
        if options.cuda_graph and windowed:
            if note is not None:
                note(f"{name}: no graph row (GraphDecoder has no sliding-window attention)")
        elif options.cuda_graph:
            rows.append(
                Candidate(
                    f"{name} (static KV, graph)",
                    role,
                    model,
                    "static",
                    chunk,
                    cuda_graph=True,
                    compile=options.compile,
                )
            )
        return rows

    rows = []
    if teacher is not None:
        rows += attention_rows("teacher", "teacher", teacher, options.teacher_chunk)
    if reference is not None:
        kinds = ["growing", "static"] if options.static_cache else ["growing"]
        for kind in kinds:
            label = "teacher (transformers" + (", static KV)" if kind == "static" else ")")
            rows.append(Candidate(label, "teacher", reference, kind, backend="transformers"))
    for name, model in students:
        if any(t != "mamba" for t in model.config.layer_types):
            rows += attention_rows(name, "student", model, options.hybrid_chunk)
        else:
            rows.append(
                Candidate(
                    name,
                    "student",
                    model,
                    "none",
                    options.linear_chunk,
                    cuda_graph=options.cuda_graph,
                    compile=options.compile and options.cuda_graph,
                )
            )
    return rows


@dataclass
class BenchSettings:
    """What to measure (see the module docstring for what each number means)."""

    lengths: list[int]
    batches: list[int] = field(default_factory=lambda: [1])
    decode_tokens: int = 32
    prefill_batch: int | None = None
    warmup: bool = True
    seed: int = 0


def parse_count(text: str) -> int:
    """``"4k"`` → 4096, ``"103k"`` → 105472, ``"1m"`` → 1048576, ``"1000"`` → 1000.

    Raises:
        ValueError: naming the bad entry.
    """
    value = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(value[-1:], 1)
    digits = value[:-1] if scale > 1 else value
    try:
        number = float(digits)
    except ValueError:
        raise ValueError(f"{text!r} is not a count like 4096, 4k or 1m") from None
    count = int(round(number * scale))
    if count < 1:
        raise ValueError(f"{text!r} must be at least 1")
    return count


def parse_counts(text: str) -> list[int]:
    """Comma list of :func:`parse_count` entries, e.g. ``"1k,4k,128k"``."""
    return [parse_count(part) for part in text.split(",") if part.strip()]


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _pack(model: DecoderLM) -> None:
    """Pack each layer's input projections into one matrix (inference on CUDA)."""
    if model.device.type != "cuda":
        return
    for layer in model.layers:
        layer.pack_projections()


@torch.no_grad()
def measure(
    candidate: Candidate,
    length: int,
    batch: int,
    settings: BenchSettings,
    device: torch.device,
    graph=None,
) -> dict:
    """Prefill ``length`` tokens then decode ``settings.decode_tokens`` at ``batch`` rows.

    Args:
        graph: a :class:`~mmdistill.graph_decode.GraphDecoder` for ``batch`` rows (its cache is
            reset and reused) when an all-Mamba candidate decodes from a CUDA graph. Candidates
            with a static KV cache capture their own, sized for ``length``: before the prefill
            when it fills all ``batch`` rows, after it (its activations freed, as the eager
            rows' replicated caches are made) when its rows are replicated.

    Returns:
        One result row (see ``docs/benchmarks.md``). Out-of-memory errors propagate (the
        caller records them).
    """
    model = candidate.model
    n = settings.decode_tokens
    if candidate.backend == "transformers":
        static = candidate.kv_cache == "static"
        timings = measure_reference(model, length, batch, n, settings.seed, static)
        return _row(candidate.name, length, batch, batch, n, *timings, None)
    rows = min(settings.prefill_batch or batch, batch)
    generator = torch.Generator().manual_seed(settings.seed + length)
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=generator)
    ids = ids.to(device)
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    chunk = candidate.prefill_chunk
    per_length_graph = candidate.cuda_graph and candidate.kv_cache == "static"
    if per_length_graph and rows == batch:
        graph = _graph_for(candidate, batch, length, settings)
    if graph is not None and rows == batch:
        timer.start()
        logits = graph.prefill(ids, chunk_size=chunk)
        prefill_ms = timer.stop_ms()
        cache = graph.cache
    else:
        max_length = length + n + 1 if candidate.kv_cache == "static" else None
        cache = LMCache(model, rows, device, model.dtype, max_length=max_length)
        timer.start()
        logits = prefill(model, cache, ids, chunk_size=chunk)
        prefill_ms = timer.stop_ms()
    del ids
    if rows != batch:
        repeat = torch.arange(rows, device=device).repeat(-(-batch // rows))[:batch]
        logits = logits.index_select(0, repeat)
        if per_length_graph:
            graph = _graph_for(candidate, batch, length, settings)
        if graph is not None:
            graph.load_cache(cache)
            cache = graph.cache
        else:
            cache.select(repeat)
    tokens = logits.argmax(-1)
    if graph is not None:
        graph.tokens.copy_(tokens)
        timer.start()
        for _ in range(n):
            graph.replay()
        decode_ms = timer.stop_ms()
    else:
        timer.start()
        for _ in range(n):
            logits = model(tokens[:, None], cache=cache, logits_slice=slice(-1, None)).logits
            tokens = logits[:, -1].argmax(-1)
        decode_ms = timer.stop_ms()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return _row(candidate.name, length, batch, rows, n, prefill_ms, decode_ms, peak, cache.nbytes())


def _row(name, length, batch, rows, n, prefill_ms, decode_ms, peak, cache_bytes) -> dict:
    """One result row (schema in docs/benchmarks.md)."""
    return {
        "model": name,
        "length": length,
        "batch": batch,
        "prefill_batch": rows,
        "status": "ok",
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": decode_ms / n if n else None,
        "decode_tokens_per_s": batch * n / (decode_ms / 1e3) if n and decode_ms > 0 else None,
        "peak_memory_bytes": peak,
        "cache_bytes": cache_bytes,
    }


def _graph_for(candidate: Candidate, batch: int, length: int, settings: BenchSettings):
    """A captured decode step for ``batch`` rows (warm-up, compilation and capture happen here);
    a static KV cache is sized for ``length`` prompt tokens and the decode steps."""
    capacity = length + settings.decode_tokens + 1 if candidate.kv_cache == "static" else None
    return GraphDecoder(candidate.model, batch, compile=candidate.compile, max_length=capacity)


def run_bench(
    candidates: list[Candidate],
    settings: BenchSettings,
    device: str | torch.device,
    offload: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure every candidate at every batch and length.

    Args:
        candidates: models and how to run them; teachers first.
        settings: lengths, batches, decode tokens, replication.
        device: where to run.
        offload: keep models on the CPU between their turns (only the measured one on the
            device), so each model's memory numbers and limits are its own.
        progress: called with a one-line status before each row.

    Returns:
        The bench document (schema in ``docs/benchmarks.md``).
    """
    device = torch.device(device)
    results = []
    for candidate in candidates:
        model = candidate.model
        if offload and model.device != device:
            model.to(device)
        if candidate.backend == "mmdistill":
            _pack(model)
        for batch in settings.batches:
            graph = None
            failed: list[int] = []
            warm = settings.warmup
            for length in settings.lengths:
                row = {"model": candidate.name, "length": length, "batch": batch}
                if any(length >= f for f in failed) or _failed_smaller(results, row):
                    results.append({**row, "status": "skipped"})
                    continue
                if progress:
                    progress(f"{candidate.name}: batch {batch}, length {length}")
                try:
                    if candidate.cuda_graph and candidate.kv_cache != "static" and graph is None:
                        graph = _graph_for(candidate, batch, length, settings)
                    if warm:  # untimed: kernel compilation, autotuning, cuBLAS handles
                        chunk = candidate.prefill_chunk
                        short = min(length, 2 * chunk + 1 if chunk else 1024)
                        warm_settings = BenchSettings([short], [batch], 2, 1, seed=settings.seed)
                        measure(candidate, short, batch, warm_settings, device, graph)
                        warm = False
                    results.append(measure(candidate, length, batch, settings, device, graph))
                except Exception as exc:  # noqa: BLE001 - OOM is a result, not a failure
                    if not _is_oom(exc):
                        raise
                    graph = None
                    failed.append(length)
                    results.append({**row, "status": "oom", "error": str(exc).splitlines()[0]})
                _release(device)
            del graph
            _release(device)
        if offload and device.type != "cpu":
            model.to("cpu")
            _release(device)
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe_device(device),
        "torch": torch.__version__,
        "settings": asdict(settings),
        "models": [c.describe() for c in candidates],
        "results": results,
        "ratios": ratios(results, candidates),
    }


def _failed_smaller(results: list[dict], row: dict) -> bool:
    """A smaller-or-equal batch of the same model already ran out of memory at this length or
    a shorter one."""
    return any(
        r["model"] == row["model"]
        and r["status"] == "oom"
        and r["batch"] <= row["batch"]
        and r["length"] <= row["length"]
        for r in results
    )


def describe_device(device: torch.device) -> dict:
    """Name and memory of the bench device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory}
    return {"type": device.type, "name": device.type}


def ratios(results: list[dict], candidates: Iterable[Candidate]) -> list[dict]:
    """Each student row against each teacher row at the same length and batch.

    ``prefill_speedup`` and ``decode_speedup`` are teacher time over student time,
    ``throughput_ratio`` student tokens/s over teacher tokens/s, ``memory_saving``
    ``1 - student peak / teacher peak``.
    """
    roles = {c.name: c.role for c in candidates}
    ok = [r for r in results if r.get("status") == "ok"]
    out = []
    for s in (r for r in ok if roles.get(r["model"]) == "student"):
        for t in (r for r in ok if roles.get(r["model"]) == "teacher"):
            if (t["length"], t["batch"]) != (s["length"], s["batch"]):
                continue
            entry = {
                "student": s["model"],
                "teacher": t["model"],
                "length": s["length"],
                "batch": s["batch"],
                "prefill_speedup": _ratio(t["prefill_ms"], s["prefill_ms"]),
                "decode_speedup": _ratio(t["decode_ms_per_token"], s["decode_ms_per_token"]),
                "throughput_ratio": _ratio(s["decode_tokens_per_s"], t["decode_tokens_per_s"]),
                "memory_saving": None,
            }
            if s.get("peak_memory_bytes") and t.get("peak_memory_bytes"):
                entry["memory_saving"] = 1 - s["peak_memory_bytes"] / t["peak_memory_bytes"]
            out.append(entry)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def plot(document: dict, path: str | Path) -> None:
    """Latency and memory against context length, one line per model (smallest batch).

    Three panels: prefill latency, decode latency per token, peak memory. Out-of-memory rows
    are marked with a cross at the top of the panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = document["results"]
    batch = min(r["batch"] for r in rows)
    names = [m["name"] for m in document["models"]]
    panels = [
        ("prefill_ms", "prefill latency (ms)", 1.0),
        ("decode_ms_per_token", "decode latency per token (ms)", 1.0),
        ("peak_memory_bytes", "peak GPU memory (GiB)", 1 / 2**30),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for name in names:
            mine = [r for r in rows if r["model"] == name and r["batch"] == batch]
            good = [r for r in mine if r["status"] == "ok" and r.get(key) is not None]
            if good:
                (line,) = ax.plot(
                    [r["length"] for r in good],
                    [r[key] * scale for r in good],
                    marker="o",
                    markersize=3,
                    label=name,
                )
                bad = [r["length"] for r in mine if r["status"] in ("oom", "skipped")]
                if bad:
                    top = max(r[key] * scale for r in good)
                    ax.scatter(bad, [top] * len(bad), marker="x", color=line.get_color())
        ax.set_xscale("log", base=2)
        if key != "peak_memory_bytes":
            ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    device = document["device"]["name"]
    fig.suptitle(
        f"batch {batch}, {device}, {document['date'][:10]} (x = out of memory)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def human_count(n: int) -> str:
    """4096 → ``"4k"``, 105472 → ``"103k"``, 1048576 → ``"1m"``, 1000 → ``"1000"`` (the forms
    :func:`parse_count` reads)."""
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}m"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def format_bytes(n: int | None) -> str:
    """Bytes as GiB with two decimals; ``-`` when unknown."""
    if n is None:
        return "-"
    return f"{n / 2**30:.2f}"


def format_seconds(ms: float | None) -> str:
    """Milliseconds shown as seconds, three significant digits (whole numbers from 100 s);
    ``-`` when unknown."""
    return "-" if ms is None else format_ms(ms / 1e3)


def format_ms(ms: float | None) -> str:
    """Milliseconds with three significant digits (whole numbers from 100); ``-`` when unknown."""
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    return f"{ms:.3g}"
