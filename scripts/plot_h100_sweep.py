"""Redraw ``docs/bench_sweep_h100.png`` from the H100 results in ``docs/results``.

The batch-1 sweep came from two runs (docs/results/MANIFEST.md): the linear student's rows from
the 1643Z sweep (no attention, so cuDNN's cached-attention cost never touched them), the
teacher's and the hybrid's, each with a growing KV cache, a static one and a static one replayed
from a CUDA graph, from the 1753Z sweep. This
joins those rows into one bench document and plots it with :func:`mmdistill.bench.plot`.
Usage: ``python scripts/plot_h100_sweep.py``
"""

from __future__ import annotations

import json
from pathlib import Path

from mmdistill import bench

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
GRAPH_SWEEP = "bench-sweep_teacher-hybrid_h100_2026-11-22T1753Z.json"
LINEAR_SWEEP = "bench-sweep_teacher-linear-hybrid_h100_2026-11-22T1643Z.json"
LABELS = {
    "seeded:none": "linear (none, graph)",
    "seeded:every:4": "hybrid (every:4)",
    "seeded:every:4 (static KV)": "hybrid (static KV)",
    "seeded:every:4 (static KV, graph)": "hybrid (static KV, graph)",
}


def rows(name: str, keep) -> tuple[list[dict], list[dict]]:
    document = json.loads((RESULTS / name).read_text())
    models = [m for m in document["models"] if keep(m["name"])]
    return models, [r for r in document["results"] if keep(r["model"])]


def main() -> None:
    document = json.loads((RESULTS / GRAPH_SWEEP).read_text())
    document["models"], document["results"] = [], []
    for name, keep in (
        (GRAPH_SWEEP, lambda m: m.startswith("teacher")),
        (LINEAR_SWEEP, lambda m: m == "seeded:none"),
        (GRAPH_SWEEP, lambda m: m.startswith("seeded:every:4")),
    ):
        models, results = rows(name, keep)
        document["models"] += models
        document["results"] += results
    for entry in document["models"]:
        entry["name"] = LABELS.get(entry["name"], entry["name"])
    for entry in document["results"]:
        entry["model"] = LABELS.get(entry["model"], entry["model"])
    out = RESULTS.parent / "bench_sweep_h100.png"
    bench.plot(document, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
