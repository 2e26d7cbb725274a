"""Batch-1 decode step of a random-weight student against the weight-read bound (CUDA only).

Builds a random teacher of a registered shape on the GPU (default HoVLE-2.6B), seeds a student
(default: linear, every layer Mamba-2), prefills a prompt, then times one greedy decode step:

* eagerly (one Python-launched kernel after another);
* replayed from a CUDA graph (:class:`~mmdistill.graph_decode.GraphDecoder`);
* ``torch.compile``'d, then replayed from a CUDA graph (compile time reported).

The bound is the time to read every weight once at the measured memory bandwidth (a large
device-to-device copy, bytes read plus written; docs/benchmarks.md). A profile of one eager step
lists the kernels it launches and their total GPU time, which is what a graph can approach.

Usage::

    python benchmarks/decode.py --json decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from mmdistill.bench import random_model
from mmdistill.graph_decode import GraphDecoder
from mmdistill.model import LMCache
from mmdistill.seeding import seed
from mmdistill.timing import mean_ms


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = [mean_ms(lambda: dst.copy_(src), "cuda") for _ in range(12)]
    return 2 * src.numel() * src.element_size() / (statistics.median(times[2:]) / 1e3)


def eager_decode(student, ids: torch.Tensor, doc: dict) -> None:
    """Time and profile the model's own decode step, one kernel launch at a time."""
    from torch.profiler import ProfilerActivity, profile

    cache = LMCache(student, 1, "cuda", student.dtype)
    logits = student(ids, cache=cache, logits_slice=slice(-1, None)).logits[:, -1]
    token = logits.argmax(-1)

    def eager_step():
        nonlocal token
        out = student(token[:, None], cache=cache, logits_slice=slice(-1, None)).logits
        token = out[:, -1].argmax(-1)

    for _ in range(3):
        eager_step()
    doc["eager_ms"] = mean_ms(eager_step, "cuda", 20)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager_step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    doc["eager_kernels_per_step"] = len(kernels)
    doc["eager_kernel_time_ms"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), file=sys.stderr)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="hovle-2.6b")
    parser.add_argument("--layout", default="none", help="attention layers kept (seeding spec)")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    dtype = torch.bfloat16
    teacher = random_model(args.shape, "cuda", dtype)
    student = seed(teacher, args.layout)
    del teacher
    torch.cuda.empty_cache()
    weight_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    bandwidth = copy_bandwidth()
    doc = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "shape": args.shape,
        "layout": args.layout,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "bound_ms": weight_bytes / bandwidth * 1e3,
    }
    ids = torch.randint(0, student.config.vocab_size, (1, args.prompt), device="cuda")
    for layer in student.layers:
        layer.pack_projections()

    save(doc, args.json)
    eager_decode(student, ids, doc)
    save(doc, args.json)
    if not args.no_compile and all(t == "mamba" for t in student.config.layer_types):
        for compiled in (False, True):
            t0 = time.perf_counter()
            decoder = GraphDecoder(student, 1, compile=compiled)
            setup_s = time.perf_counter() - t0
            first = decoder.prefill(ids, chunk_size=8192)
            decoder.tokens.copy_(first.argmax(-1))
            decoder.replay()
            key = "graph_compiled" if compiled else "graph"
            doc[f"{key}_ms"] = mean_ms(decoder.replay, "cuda", args.steps)
            doc[f"{key}_setup_s"] = setup_s
            save(doc, args.json)
            del decoder
            torch.cuda.empty_cache()
    for key in ("eager_ms", "graph_ms", "graph_compiled_ms"):
        if key in doc:
            doc[key.replace("_ms", "_over_bound")] = doc[key] / doc["bound_ms"]
    save(doc, args.json)
    print(json.dumps(doc, indent=2))


def save(doc: dict, path: str | None) -> None:
    """Write what is measured so far (a later phase may run out of time)."""
    if path:
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
