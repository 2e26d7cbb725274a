"""Redraw ``docs/bench_sweep_h100.png`` from the H100 results in ``docs/results``.

The batch-1 sweep came from three calls: the linear student's rows from ``run8`` (no attention,
so cuDNN's cached-attention cost never touched them), the teacher's from ``run9`` and the
hybrid's, with both KV caches, from ``run10`` (after cached attention left cuDNN out). This
joins those rows into one bench document and plots it with :func:`mmdistill.bench.plot`.
Usage: ``python scripts/plot_h100_sweep.py``
"""

from __future__ import annotations

import json
from pathlib import Path

from mmdistill import bench

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
LABELS = {
    "seeded:none": "linear (none)",
    "seeded:every:4": "hybrid (every:4)",
    "seeded:every:4 (static KV)": "hybrid (static KV)",
}


def rows(name: str, keep) -> tuple[list[dict], list[dict]]:
    document = json.loads((RESULTS / name).read_text())
    models = [m for m in document["models"] if keep(m["name"])]
    return models, [r for r in document["results"] if keep(r["model"])]


def main() -> None:
    document = json.loads((RESULTS / "run9_sweep.json").read_text())
    document["models"], document["results"] = [], []
    for name, keep in (
        ("run9_sweep.json", lambda m: m.startswith("teacher")),
        ("run8_sweep.json", lambda m: m == "seeded:none"),
        ("run10_sweep_hybrid.json", lambda m: True),
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
