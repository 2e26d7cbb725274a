"""Variants of the OmniMamba demo side by side: held-out and training t2i accuracy per variant and
guidance scale, mmu before and after (docs/omni.md reports the runs).

Each variant is ``mmdistill demo --omni`` with its own recipe overrides, from one base student
(``OUT/base/linear/student``, distilled first if missing), in its own process (several at once:
``--jobs``). ``--scenes N`` also writes ``OUT/scenes/scenes.jsonl``: N images of 1 to 4 objects
in distinct cells, every object a *training* combination (so held-out captions stay unseen),
which a variant adds as a t2i source with ``omni.t2i=...`` (the ``scenes`` placeholder below).

    python scripts/omni_sweep.py --out runs/sweep --scenes 4000 --jobs 4 --cfg 0,2,4 \\
        --variant shipped= \\
        --variant "scenes=omni.t2i=SCENES;omni.max_caption_tokens=96"

Writes ``OUT/sweep.json`` and prints one row per variant and guidance scale.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

SCENES = "SCENES"


def write_scenes(directory: Path, n: int, seed: int = 0) -> Path:
    """N training-only scenes of 1-4 objects (distinct cells), as a caption file."""
    from mmdistill.data.shapes_t2i import all_combinations, caption, is_held_out, render
    from mmdistill.files import atomic_write_text

    path = directory / "scenes.jsonl"
    if path.is_file():
        return path
    rng = random.Random(seed)
    allowed = [a for a in all_combinations() if not is_held_out(a)]
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        cells = rng.sample(sorted({a.position for a in allowed}), rng.randint(1, 4))
        objects = [rng.choice([a for a in allowed if a.position == c]) for c in cells]
        rel = f"images/scene_{i:05d}.png"
        render(objects).save(directory / rel)
        lines.append(json.dumps({"image": rel, "caption": caption(objects)}))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def run_variant(out: Path, name: str, overrides: list[str], questions: int) -> None:
    """One demo variant in this process (the child side of ``--run-one``)."""
    from mmdistill.demo.omni import run_omni_demo

    report = run_omni_demo(out / name, overrides, questions)
    print(json.dumps(report))


def score(out: Path, name: str, cfg_scales: list[float]) -> list[dict]:
    """Held-out and training exact match of a finished variant at each guidance scale."""
    from mmdistill.t2i_evaluation import evaluate_t2i, load_t2i_student
    from mmdistill.t2i_generation import Sampling
    from mmdistill.training.omni_data import caption_file

    report = json.loads((out / name / "omni" / "omni.json").read_text())
    student = load_t2i_student(report["student_dir"])
    rows = []
    for cfg in cfg_scales:
        sampling = Sampling(cfg_scale=cfg)
        held, _, _ = evaluate_t2i(
            student, caption_file("builtin:shapes-t2i/heldout", None), sampling
        )
        train, _, _ = evaluate_t2i(student, caption_file("builtin:shapes-t2i", None), sampling)
        rows.append(
            {
                "variant": name,
                "cfg": cfg,
                "heldout": held["exact_match"],
                "heldout_attributes": held["attribute_accuracy"],
                "train": train["exact_match"],
                "mmu_before": report["mmu_accuracy_before"],
                "mmu_after": report["mmu_accuracy_after"],
                "seconds": report["seconds"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=O1;O2")
    parser.add_argument("--scenes", type=int, default=0, help="scene images to write")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cfg", default="0", help="guidance scales to score, e.g. 0,2,4")
    parser.add_argument("--questions", type=int, default=240)
    parser.add_argument("--run-one", nargs=2, metavar=("NAME", "OVERRIDES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        name, joined = args.run_one
        run_variant(args.out, name, [o for o in joined.split(";") if o], args.questions)
        return

    from mmdistill.demo.omni import base_student

    base = base_student(args.out / "base", [], print)
    scenes = write_scenes(args.out / "scenes", args.scenes) if args.scenes else None
    sources = f"[{{source: builtin:shapes-t2i}}, {{source: {scenes}}}]"
    pending, running, rows = [v.partition("=")[::2] for v in args.variant], [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            name, joined = pending.pop(0)
            linear = args.out / name / "linear"
            if not linear.exists():
                shutil.copytree(base.parent, linear)
            cmd = [
                sys.executable,
                __file__,
                "--out",
                str(args.out),
                "--questions",
                str(args.questions),
                "--run-one",
                name,
                joined.replace(SCENES, sources),
            ]
            with open(args.out / f"{name}.log", "a") as log:  # the child keeps its own handle
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            running.append((name, proc))
        name, proc = running.pop(0)
        if proc.wait() != 0:
            print(f"{name}: failed, see {args.out / (name + '.log')}")
            continue
        rows += score(args.out, name, [float(c) for c in args.cfg.split(",")])
        for row in rows[-len(args.cfg.split(",")) :]:
            a = row["heldout_attributes"]
            print(
                f"{row['variant']:<16} cfg {row['cfg']:<3g} held-out {row['heldout']:.3f} "
                f"(c {a['colour']:.2f} s {a['shape']:.2f} z {a['size']:.2f} p "
                f"{a['position']:.2f}) train {row['train']:.3f} mmu {row['mmu_before']:.3f}->"
                f"{row['mmu_after']:.3f} {row['seconds']:.0f}s",
                flush=True,
            )
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
