"""Text-to-image speed and memory after a long shared context (``mmdistill bench --task t2i``).

Every model gets a decoupled image vocabulary (:func:`t2i_model`). For each model, context
length ``L`` and batch ``B``, with the same random prompt for every model:

* **prefill** -- one row: ``L`` random text tokens (the shared context), then the t2i prompt
  ``<|t2i|> <|sot|> caption <|eot|> <|soi|>`` with a random caption of ``caption_tokens``
  tokens, through the model into a fresh cache until the image head's logits at the last
  position are ready (prefill chunks as in :mod:`mmdistill.bench`).
* **replicate** -- that one-row cache copied into every row of the decoder's ``B``-row cache
  (:meth:`~mmdistill.graph_decode.GraphDecoder.load_cache`); the one-row cache is then freed.
* **decode** -- ``grid * grid`` codes per row: the first is the argmax of the prefill's logits,
  each other one a greedy step of :class:`~mmdistill.t2i_graph.ImageGraphDecoder` (code and
  position embeddings, every layer, image head, argmax), replayed from a CUDA graph on CUDA and
  run eagerly elsewhere: ``grid * grid - 1`` steps.
* **images/s** = ``B`` / (prefill + replicate + decode). Turning codes into pixels (the image
  tokenizer's decoder) is not timed.
* **peak memory** -- ``torch.cuda.max_memory_allocated`` from the prefill to the last code.

Not timed: building the decoder (its cache, warm-up steps and graph capture), done once per
batch size by a server. Timing: CUDA events on CUDA, the wall clock elsewhere.

Batch search, per model and length: one prefill, then batches ``1, 2, 4, ...`` are probed
(``kind: "probe"``: ``probe_steps`` decode steps, the decode time scaled to the whole image, the
one-row cache kept throughout) until doubling the batch raises images/s by less than the
fraction ``min_gain``, a batch runs out of memory (or its cache alone would not fit), or
``max_batch``. Then batch 1 and the best probed batch are measured in full (``kind: "full"``,
each with its own prefill), as described above. A probe that runs out of memory ends the search
with ``status: "oom"``.
"""

from __future__ import annotations

import datetime
import gc
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .bench import Candidate, RowOptions, _is_oom, _pack, describe_device
from .cached_forward import prefill
from .data.t2i import t2i_prompt
from .image_vocab import ImageVocabSpec
from .model import DecoderLM, LMCache
from .omni_student import add_image_vocabulary, merge_task
from .t2i_graph import ImageGraphDecoder
from .task_lora import LoraSpec
from .timing import Timer

SCHEMA = "mmdistill.bench-t2i/1"
LORA_MODES = ("merged", "adapters")


@dataclass
class T2ISettings:
    """What to measure (module docstring). Image sizes default to LlamaGen VQ-16's token counts
    at 256x256 pixels (a 16x16 grid of codes from a 16384-code book), as OmniMamba uses."""

    lengths: list[int]
    grid: int = 16
    codebook_size: int = 16384
    embed_dim: int = 256
    caption_tokens: int = 68
    lora: str = "merged"
    max_batch: int = 4096
    min_gain: float = 0.05
    probe_steps: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lora not in LORA_MODES:
            raise ValueError(f"lora must be one of {LORA_MODES}; got {self.lora!r}")


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def t2i_model(model: DecoderLM, settings: T2ISettings, adapters: bool) -> DecoderLM:
    """``model`` ready for t2i: a model without an image vocabulary gets a decoupled one of
    ``settings``' sizes (with task LoRA adapters when ``adapters``; models without Mamba layers
    take none); with ``settings.lora == "merged"`` the t2i adapter is folded into the weights.
    """
    if model.image_vocab is None:
        spec = ImageVocabSpec(
            model.config.vocab_size, settings.codebook_size, settings.grid, settings.embed_dim
        )
        lora = LoraSpec() if adapters else None
        with _default_dtype(model.dtype):  # the adapters are built in the model's dtype
            model = add_image_vocabulary(model, spec, lora, seed=settings.seed)
    if settings.lora == "merged" and model.config.lora is not None:
        model = merge_task(model, "t2i")
    return model.eval()


def prompt_ids(model: DecoderLM, length: int, settings: T2ISettings) -> torch.Tensor:
    """``[1, length + caption_tokens + 4]``: random context, then the t2i prompt of a random
    caption (the same for every model of the same text vocabulary)."""
    spec = model.image_vocab.spec
    generator = torch.Generator().manual_seed(settings.seed + length)
    context = torch.randint(0, spec.text_vocab_size, (length,), generator=generator)
    caption = torch.randint(
        0, spec.text_vocab_size, (settings.caption_tokens,), generator=generator
    )
    prompt = torch.tensor(t2i_prompt(spec, caption.tolist()))
    return torch.cat([context, prompt])[None]


def _prefill(candidate: Candidate, ids: torch.Tensor, timer: Timer):
    """(one-row cache, image-head logits ``[1, classes]``, milliseconds), as the t2i task."""
    model = candidate.model
    model.use_task("t2i")
    timer.start()
    cache = LMCache(model, 1, model.device, model.dtype)
    logits = prefill(model, cache, ids, chunk_size=candidate.prefill_chunk, head="image")
    return cache, logits, timer.stop_ms()


def _replicate(candidate: Candidate, cache: LMCache, batch: int, timer: Timer):
    """A decoder for ``batch`` rows (built untimed) with ``cache`` copied into each row:
    (decoder, milliseconds of the copy)."""
    model = candidate.model
    decoder = ImageGraphDecoder(
        model,
        batch,
        compile=candidate.compile,
        max_length=cache.seen + model.image_vocab.spec.codes_per_image,
        capture=candidate.cuda_graph,
    )
    timer.start()
    decoder.load_cache(cache)
    return decoder, timer.stop_ms()


def _decode(decoder: ImageGraphDecoder, logits: torch.Tensor, steps: int, timer: Timer) -> float:
    """Milliseconds of the first code and ``steps`` decode steps."""
    timer.start()
    decoder.start(logits)
    for _ in range(steps):
        decoder.replay()
    return timer.stop_ms()


def _fits(candidate: Candidate, cache: LMCache, batch: int, device: torch.device) -> str | None:
    """``None``, or why a ``batch``-row decoder's cache cannot fit in the free GPU memory (with
    1 GiB to spare for the step's activations)."""
    if device.type != "cuda":
        return None
    model = candidate.model
    capacity = cache.seen + model.image_vocab.spec.codes_per_image
    need = batch * LMCache(model, 1, "meta", model.dtype, max_length=capacity).nbytes()
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    free = torch.cuda.mem_get_info(device)[0] + cached
    if need + 2**30 <= free:
        return None
    return f"a cache of {batch} rows needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def _row(candidate, length, batch, kind, steps, times, decoder, device) -> dict:
    """One result row; ``times`` = (prefill, replicate, whole-image decode) milliseconds."""
    prefill_ms, replicate_ms, decode_ms = times
    total = prefill_ms + replicate_ms + decode_ms
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "model": candidate.name,
        "length": length,
        "batch": batch,
        "kind": kind,
        "status": "ok",
        "steps_timed": steps,
        "prefill_ms": prefill_ms,
        "replicate_ms": replicate_ms,
        "decode_ms": decode_ms,
        "ms_per_step": decode_ms / (decoder.spec.codes_per_image - 1),
        "total_ms": total,
        "images_per_s": batch / (total / 1e3),
        "peak_memory_bytes": peak,
        "cache_bytes": decoder.cache.nbytes(),
    }


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@torch.no_grad()
def measure_full(
    candidate: Candidate, length: int, batch: int, settings: T2ISettings, device: torch.device
) -> dict:
    """Prefill, replicate to ``batch`` rows (the one-row cache then freed), decode whole images.

    Returns:
        A ``kind: "full"`` row (``docs/benchmarks.md``). Out-of-memory errors propagate.
    """
    ids = prompt_ids(candidate.model, length, settings).to(device)
    timer = Timer(device)
    _reset_peak(device)
    cache, logits, prefill_ms = _prefill(candidate, ids, timer)
    decoder, replicate_ms = _replicate(candidate, cache, batch, timer)
    del cache
    steps = decoder.spec.codes_per_image - 1
    decode_ms = _decode(decoder, logits, steps, timer)
    times = (prefill_ms, replicate_ms, decode_ms)
    return _row(candidate, length, batch, "full", steps, times, decoder, device)


@torch.no_grad()
def probe(candidate: Candidate, length: int, batch: int, prefilled, settings, device) -> dict:
    """A ``kind: "probe"`` row: the shared ``prefilled`` (cache, logits, prefill ms) replicated
    to ``batch`` rows and ``settings.probe_steps`` steps, their time scaled to a whole image."""
    cache, logits, prefill_ms = prefilled
    timer = Timer(device)
    _reset_peak(device)
    decoder, replicate_ms = _replicate(candidate, cache, batch, timer)
    steps = min(settings.probe_steps, decoder.spec.codes_per_image - 1)
    decode_ms = _decode(decoder, logits, steps, timer) * (decoder.spec.codes_per_image - 1) / steps
    times = (prefill_ms, replicate_ms, decode_ms)
    return _row(candidate, length, batch, "probe", steps, times, decoder, device)


def search_batches(
    candidate: Candidate,
    length: int,
    settings: T2ISettings,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict]:
    """Probe batches 1, 2, 4, ... after one shared prefill (module docstring).

    Returns:
        The probe rows (the last may be ``"oom"``; a prefill out of memory gives one ``"oom"``
        row) and the search's summary: ``{"model", "length", "probed", "best_batch" (``None``
        when batch 1 did not fit), "stopped_by": "gain", "oom" or "max_batch"}``.
    """
    ids = prompt_ids(candidate.model, length, settings).to(device)
    with torch.no_grad():
        prefilled, error = _attempt(_prefill, candidate, ids, Timer(device))
    if error is not None:
        _free(device, collect=True)
        rows = [_oom_row(candidate.name, length, 1, "probe", error)]
        return rows, _summary(candidate.name, length, [], "oom")
    rows: list[dict] = []
    batch = 1
    while batch <= settings.max_batch:
        if progress:
            progress(f"{candidate.name}: {length} tokens, probing batch {batch}")
        rows.append(_probe_row(candidate, length, batch, prefilled, settings, device))
        stop = _stop(rows, settings.min_gain)
        if stop:
            return rows, _summary(candidate.name, length, rows, stop)
        batch *= 2
    return rows, _summary(candidate.name, length, rows, "max_batch")


def _stop(rows: list[dict], min_gain: float) -> str | None:
    """Why the search ends after ``rows`` (all but the last are ``ok``), or ``None``."""
    if rows[-1]["status"] != "ok":
        return "oom"
    if len(rows) > 1 and rows[-1]["images_per_s"] < rows[-2]["images_per_s"] * (1 + min_gain):
        return "gain"
    return None


def _summary(model: str, length: int, rows: list[dict], stopped_by: str) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["images_per_s"])["batch"] if ok else None
    probed = [r["batch"] for r in rows]
    return {
        "model": model,
        "length": length,
        "probed": probed,
        "best_batch": best,
        "stopped_by": stopped_by,
    }


def _attempt(fn: Callable, *args):
    """``(fn(*args), None)``, or ``(None, first line of the error)`` when it ran out of memory."""
    try:
        return fn(*args), None
    except Exception as exc:  # noqa: BLE001 - OOM is a result, not a failure
        if not _is_oom(exc):
            raise
        return None, str(exc).splitlines()[0]


def _free(device: torch.device, collect: bool = False) -> None:
    """Give cached GPU memory back (collecting garbage first after an out-of-memory error,
    whose traceback held tensors)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _probe_row(candidate, length, batch, prefilled, settings, device) -> dict:
    """:func:`probe`, or an ``"oom"`` row when it runs out of memory (or would: :func:`_fits`)."""
    row, error = None, _fits(candidate, prefilled[0], batch, device)
    if error is None:
        row, error = _attempt(probe, candidate, length, batch, prefilled, settings, device)
    _free(device, collect=row is None)
    return row or _oom_row(candidate.name, length, batch, "probe", error)


def _full_row(candidate, length, batch, settings, device) -> dict:
    """:func:`measure_full`, or an ``"oom"`` row."""
    row, error = _attempt(measure_full, candidate, length, batch, settings, device)
    _free(device, collect=row is None)
    return row or _oom_row(candidate.name, length, batch, "full", error)


def _oom_row(model: str, length: int, batch: int, kind: str, error: str) -> dict:
    return {
        "model": model,
        "length": length,
        "batch": batch,
        "kind": kind,
        "status": "oom",
        "error": error,
    }


def measure_model(
    candidate: Candidate,
    length: int,
    settings: T2ISettings,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict]:
    """The batch search, then full rows at batch 1 and at the best probed batch."""
    rows, summary = search_batches(candidate, length, settings, device, progress)
    _free(device)
    best = summary["best_batch"]
    for batch in sorted({1, best}) if best else []:
        if progress:
            progress(f"{candidate.name}: {length} tokens, batch {batch}, whole images")
        rows.append(_full_row(candidate, length, batch, settings, device))
    return rows, summary


def run_t2i_bench(
    candidates: list[Candidate],
    settings: T2ISettings,
    device: str | torch.device,
    offload: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Search and measure every candidate (models with image vocabularies) at every length.

    Args:
        offload: keep models on the CPU between their turns (only the measured one on the
            device), so each model's memory numbers and limits are its own.

    Returns:
        The bench document (schema in ``docs/benchmarks.md``).
    """
    device = torch.device(device)
    results, searches = [], []
    for candidate in candidates:
        model = candidate.model
        if offload and model.device != device:
            model.to(device)
        _pack(model)
        for length in settings.lengths:
            rows, summary = measure_model(candidate, length, settings, device, progress)
            results += rows
            searches.append(summary)
        if offload and device.type != "cpu":
            model.to("cpu")
            _free(device)
    return {
        "schema": SCHEMA,
        "task": "t2i",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe_device(device),
        "torch": torch.__version__,
        "settings": asdict(settings),
        "models": [describe(c) for c in candidates],
        "results": results,
        "searches": searches,
        "ratios": t2i_ratios(results, candidates),
    }


def describe(candidate: Candidate) -> dict:
    """:meth:`Candidate.describe` plus the image vocabulary and how task LoRA is applied
    (``"adapters"``, ``"merged"`` or ``None`` for none)."""
    model = candidate.model
    spec = model.image_vocab.spec.to_dict()
    spec.pop("image_tokenizer")
    if model.config.lora is not None:
        lora = "adapters"
    else:
        lora = "merged" if model.config.teacher.get("merged_task") else None
    return {**candidate.describe(), "image_vocab": spec, "lora": lora}


def t2i_ratios(results: list[dict], candidates: list[Candidate]) -> list[dict]:
    """Each student against each teacher at each length, from the full rows: at batch 1
    (``"at": "batch 1"``) and each at its best batch (``"at": "best"``).

    ``images_per_s_ratio`` is student images/s over teacher images/s; ``memory_saving`` is
    ``1 - student peak / teacher peak`` of the same rows.
    """
    roles = {c.name: c.role for c in candidates}
    full = [r for r in results if r["kind"] == "full" and r["status"] == "ok"]
    out = []
    for length in dict.fromkeys(r["length"] for r in full):
        picks = _picks([r for r in full if r["length"] == length])
        for s in (n for n in picks if roles.get(n) == "student"):
            for t in (n for n in picks if roles.get(n) == "teacher"):
                for at in ("batch 1", "best"):
                    if picks[s][at] and picks[t][at]:
                        out.append(_ratio_entry(picks[s][at], picks[t][at], at))
    return out


def _picks(rows: list[dict]) -> dict[str, dict]:
    """Per model among ``rows`` (one length): ``{"batch 1": its batch-1 row or None, "best":
    its row of most images/s}``."""
    picks = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        one = [r for r in mine if r["batch"] == 1]
        picks[name] = {
            "batch 1": one[0] if one else None,
            "best": max(mine, key=lambda r: r["images_per_s"]),
        }
    return picks


def _ratio_entry(student: dict, teacher: dict, at: str) -> dict:
    entry = {
        "student": student["model"],
        "teacher": teacher["model"],
        "length": student["length"],
        "at": at,
        "student_batch": student["batch"],
        "teacher_batch": teacher["batch"],
        "images_per_s_ratio": student["images_per_s"] / teacher["images_per_s"],
        "memory_saving": None,
    }
    if student["peak_memory_bytes"] and teacher["peak_memory_bytes"]:
        entry["memory_saving"] = 1 - student["peak_memory_bytes"] / teacher["peak_memory_bytes"]
    return entry


def t2i_candidates(
    teacher: DecoderLM | None,
    students: list[tuple[str, DecoderLM]],
    settings: T2ISettings,
    options: RowOptions,
) -> list[Candidate]:
    """The rows of a t2i run: the teacher as ``attention`` (an image vocabulary, no adapters;
    unless ``None``), then each student (an image vocabulary and task LoRA, merged or not by
    ``settings.lora``). Every model decodes through :class:`ImageGraphDecoder` (a static KV
    cache for attention layers), from a CUDA graph when ``options.cuda_graph``."""
    rows = []
    if teacher is not None:
        model = t2i_model(teacher, settings, adapters=False)
        rows.append(_candidate("attention", "teacher", model, options.teacher_chunk, options))
    for name, student in students:
        model = t2i_model(student, settings, adapters=True)
        attention = any(t != "mamba" for t in model.config.layer_types)
        chunk = options.hybrid_chunk if attention else options.linear_chunk
        rows.append(_candidate(name, "student", model, chunk, options))
    return rows


def _candidate(name, role, model, chunk, options: RowOptions) -> Candidate:
    attention = any(t != "mamba" for t in model.config.layer_types)
    return Candidate(
        name,
        role,
        model,
        "static" if attention else "none",
        chunk,
        cuda_graph=options.cuda_graph,
        compile=options.compile and options.cuda_graph,
    )
