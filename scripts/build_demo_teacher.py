"""Build the demo teacher (``builtin:shapes-hovle``) into a directory and measure it.

Trains the small HoVLE-format shapes teacher (:mod:`mmdistill.demo.teacher_builder`), writes it, loads it
back through ``mmdistill.load_teacher`` (the HoVLE path) and reports its held-out answer accuracy
(greedy, one question at a time, per question kind) next to the question-only majority baseline;
the results are added to the directory's ``shapes_teacher.json``::

    python scripts/build_demo_teacher.py --out runs/shapes-hovle --threads 2
    python scripts/build_demo_teacher.py --out mmdistill/assets/shapes_hovle --threads 2  # shipped
    python scripts/build_demo_teacher.py --out /tmp/t --set steps=50 --set schedule.warmup_steps=5 --json

``--set key=value`` (repeatable) overrides a
:class:`~mmdistill.demo.teacher_config.ShapesTeacherConfig` field in the recipes' dotlist syntax:
dotted keys for nested settings, YAML values (``--set kinds=[count,size]``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mmdistill
from mmdistill.data.synthetic import generate_samples, majority_baseline_accuracy
from mmdistill.demo.questions import evaluate_answers
from mmdistill.demo.teacher import RECORD_NAME
from mmdistill.demo.teacher_builder import build_shapes_teacher
from mmdistill.demo.teacher_config import config_with_overrides
from mmdistill.errors import TeacherError
from mmdistill.teachers.hovle_export import write_json
from mmdistill.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the teacher to")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--eval-images", type=int, default=200, help="held-out images to ask")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out images")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = config_with_overrides(args.set)
    except TeacherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    record = build_shapes_teacher(args.out, cfg, log=log)
    build_seconds = time.perf_counter() - start

    teacher = mmdistill.load_teacher(str(args.out))
    tokenizer = load_tokenizer(args.out)
    held_out = generate_samples(
        args.eval_images,
        args.eval_seed,
        cfg.image_size,
        cfg.max_shapes,
        split="eval",
        kinds=cfg.kinds,
    )
    result = evaluate_answers(teacher, tokenizer, held_out)
    # The demo data set's baseline: answers from 2000 training images' question texts.
    train = generate_samples(2000, args.eval_seed, cfg.image_size, cfg.max_shapes, kinds=cfg.kinds)
    report = {
        "directory": str(args.out),
        "build_seconds": round(build_seconds, 1),
        "threads": torch.get_num_threads(),
        "parameters": record["parameters"],
        "weights_bytes": (args.out / "model.safetensors").stat().st_size,
        "kinds": list(cfg.kinds),
        "accuracy": result["accuracy"],
        "majority_baseline": majority_baseline_accuracy(train, held_out),
        "questions": result["questions"],
        "per_kind": result["per_kind"],
    }
    record_path = args.out / RECORD_NAME
    record = json.loads(record_path.read_text())
    record["heldout"] = {k: v for k, v in report.items() if k != "directory"}
    write_json(record_path, record)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"built {args.out} in {report['build_seconds']}s ({report['threads']} threads)")
        print(f"accuracy {report['accuracy']:.3f} on {report['questions']} held-out questions")
        print(f"majority baseline {report['majority_baseline']:.3f}")
        for kind, acc in report["per_kind"].items():
            print(f"  {kind:16s} {acc:.3f}  (n={result['counts'][kind]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
