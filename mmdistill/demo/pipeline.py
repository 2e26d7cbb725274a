"""The embedded demo end to end: trained shapes teacher → seeded hybrid and linear students →
mmMamba's three stages → one table of teacher vs seeded vs distilled students.

Measured on held-out generated images (a split no training image belongs to): answer accuracy
(greedy, one question per prompt, exactly as the teacher was trained and as HoVLE's ``chat()``
prompts), and on the held-out conversations perplexity of the data, KL(teacher ‖ model) per
token and top-1 agreement with the teacher. Everything is offline and deterministic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..checkpoint import load_student
from ..data.loader import shapes_dataset
from ..data.synthetic import generate_samples
from ..evaluation import evaluate_many, tokenizer_for
from ..recipe import load_recipe
from ..seeding import seed
from ..teachers.loading import load_teacher, resolve_source
from ..trainer import distill
from .teacher import DEMO_KINDS, evaluate_answers

RECIPE = Path(__file__).with_name("recipe.yaml")
LAYOUTS = {"hybrid": "every:2", "linear": "none"}


def run_demo(
    output_dir: str | Path = "runs/demo",
    overrides: list[str] | None = None,
    questions: int = 240,
    console=None,
) -> dict[str, Any]:
    """Run the demo and return its report (also written to ``output_dir/demo.json``).

    Args:
        output_dir: where the two runs and the report go.
        overrides: recipe overrides applied to both runs (``key=value``).
        questions: held-out questions asked of every model.
        console: a rich console for progress (stderr).

    Returns:
        ``{"rows": [{"model", "accuracy", "ppl", "kl", "top1_agreement", ...}], "timings",
        "runs", "questions", "majority_baseline", ...}``.
    """
    out = Path(output_dir)
    say = console.print if console is not None else (lambda *a, **k: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    say("[bold]1/4[/] teacher: builtin:shapes-hovle (trained on first use, a few minutes)")
    resolve_source("builtin:shapes-hovle")
    timings["teacher"] = time.perf_counter() - start

    runs = {}
    recipes = {}
    for name, layout in LAYOUTS.items():
        say(f"[bold]2/4[/] distilling the {name} student ({layout})")
        recipe = load_recipe(
            RECIPE,
            [f"student.attention_layers={layout}", f"output_dir={out / name}", *(overrides or [])],
        )
        tick = time.perf_counter()
        runs[name] = distill(recipe, console=console)
        timings[f"distill_{name}"] = time.perf_counter() - tick
        recipes[name] = recipe

    say("[bold]3/4[/] evaluating teacher, seeded and distilled students on held-out images")
    tick = time.perf_counter()
    recipe = recipes["hybrid"]
    teacher = load_teacher(recipe.teacher)
    models = {"teacher": teacher}
    for name, layout in LAYOUTS.items():
        spec = recipes[name].student
        models[f"seeded {name}"] = seed(teacher, layout, mixer=spec.mixer, seed=spec.seed)
        models[f"distilled {name}"] = load_student(runs[name]["student_dir"])
    tokenizer = tokenizer_for(teacher)
    shapes = recipe.data.shapes
    # The question kinds the teacher was trained on (see DEMO_KINDS); about one of each per image.
    samples = generate_samples(
        max(1, questions // len(DEMO_KINDS)),
        seed=shapes.seed + 1,
        image_size=shapes.image_size,
        max_shapes=shapes.max_shapes,
        split="eval",
        kinds=DEMO_KINDS,
    )
    eval_file = shapes_dataset(shapes)["eval"]
    quality = evaluate_many(
        {k: v for k, v in models.items() if k != "teacher"},
        teacher,
        [eval_file],
        tokenizer=tokenizer,
        answers=False,
        max_tokens=4000,
        batch_size=8,
    )
    rows = []
    for name, model in models.items():
        answers = evaluate_answers(model, tokenizer, samples)
        row = {
            "model": name,
            "accuracy": answers["accuracy"],
            "per_kind": answers["per_kind"],
            "questions": answers["questions"],
        }
        if name == "teacher":
            row.update(kl=0.0, top1_agreement=1.0)
            first = next(iter(quality.values()))
            row["ppl"] = first["teacher_ppl"]
        else:
            q = quality[name]
            row.update(ppl=q["student_ppl"], kl=q["kl"], top1_agreement=q["top1_agreement"])
        rows.append(row)
    timings["evaluate"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    teacher_acc = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_vs_teacher"] = row["accuracy"] / teacher_acc if teacher_acc else None
    report = {
        "rows": rows,
        "questions": rows[0]["questions"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "runs": {
            name: {
                "student_dir": r["student_dir"],
                "stages": [
                    {
                        k: s[k]
                        for k in (
                            "name",
                            "initial_loss",
                            "final_loss",
                            "steps",
                            "tokens",
                            "seconds",
                        )
                    }
                    for s in r["stages"]
                ],
            }
            for name, r in runs.items()
        },
    }
    say("[bold]4/4[/] done")
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    return report
