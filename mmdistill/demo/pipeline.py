"""The embedded demo end to end: trained shapes teacher → seeded hybrid and linear students →
mmMamba's three stages → one table of teacher vs seeded vs distilled students.

Measured on held-out generated images (a split no training image belongs to): answer accuracy
(greedy, one question per prompt, exactly as the teacher was trained and as HoVLE's ``chat()``
prompts); and, on the reference answers of the same questions, perplexity, KL(teacher ‖ model)
per token and top-1 agreement with the teacher. Answers are scored as the teacher was trained:
the prompt tokens, then the answer and ``<|im_end|>`` tokenised as a new word (``▁red``), which
is also what greedy generation produces. Everything is offline and deterministic.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..data.synthetic import ShapeSample, generate_samples
from ..evaluation import tokenizer_for
from ..files import atomic_write_text
from ..frontends.hovle import chat_prompt, prepare_images
from ..metrics import TokenSums, score_tokens
from ..model import DecoderLM, load_student
from ..recipe import load_recipe
from ..seeding import seed
from ..teachers.loading import load_teacher, resolve_source
from ..tokenizer import Tokenizer
from ..trainer import distill
from ..training.resume import holds_run
from .questions import evaluate_answers
from .teacher import DEMO_KINDS

RECIPE = Path(__file__).with_name("recipe.yaml")
LAYOUTS = {"hybrid": "every:2", "linear": "none"}


def score_answers(
    models: dict[str, DecoderLM],
    tokenizer: Tokenizer,
    samples: list[ShapeSample],
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """Perplexity of the reference answers, KL(teacher ‖ model) and top-1 agreement per model.

    ``models["teacher"]`` is the reference. Every question of ``samples`` is one right-padded
    sequence ``prompt + answer<|im_end|>``; the answer tokens are scored.

    Returns:
        ``{name: {"ppl", "kl", "top1_agreement", "answer_tokens"}}``.
    """
    teacher = models["teacher"]
    config = teacher.config
    end = tokenizer.token_to_id("<|im_end|>")
    items = [(s.image, q, a) for s in samples for q, a in s.qa]
    sums = {name: TokenSums() for name in models}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pixel_values, tiles = prepare_images(config, [image for image, _, _ in chunk])
        seqs, spans = [], []
        for (_, question, answer), n in zip(chunk, tiles, strict=True):
            prompt = tokenizer.encode(chat_prompt(config, question, [n]))
            reply = tokenizer.encode(answer, add_special_tokens=False) + [end]
            seqs.append(prompt + reply)
            spans.append((len(prompt), len(prompt) + len(reply)))
        width = max(len(q) for q in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for b, (seq, (lo, hi)) in enumerate(zip(seqs, spans, strict=True)):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            target[b, lo:hi] = True
        # Position j's logits predict token j + 1.
        pred = target[:, 1:]
        labels = ids[:, 1:][pred]
        with torch.no_grad():
            logits = {
                name: model(ids, pixel_values=pixel_values, attention_mask=mask).logits[:, :-1][
                    pred
                ]
                for name, model in models.items()
            }
        for name, lg in logits.items():
            sums[name].add(score_tokens(lg, labels, logits["teacher"]))
    return {
        name: {
            "ppl": math.exp(v.nll / v.tokens),
            "kl": v.kl / v.tokens,
            "top1_agreement": v.agree / v.tokens,
            "answer_tokens": v.tokens,
        }
        for name, v in sums.items()
    }


def held_out_samples(recipe, questions: int) -> list[ShapeSample]:
    """The demo's held-out images and questions: the question kinds the teacher was trained on
    (:data:`DEMO_KINDS`), about one of each per image, from the recipe's shapes settings."""
    shapes = recipe.data.shapes
    return generate_samples(
        max(1, questions // len(DEMO_KINDS)),
        seed=shapes.seed + 1,
        image_size=shapes.image_size,
        max_shapes=shapes.max_shapes,
        split="eval",
        kinds=DEMO_KINDS,
    )


_STAGE_KEYS = ("name", "initial_loss", "final_loss", "steps", "tokens", "seconds")


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """A distillation run's student directory and per-stage losses, steps and times."""
    stages = [{k: stage[k] for k in _STAGE_KEYS} for stage in run["stages"]]
    return {"student_dir": run["student_dir"], "stages": stages}


def _evaluate(recipes: dict, runs: dict[str, dict], questions: int) -> list[dict[str, Any]]:
    """One row per model (teacher, seeded and distilled students): answer accuracy on held-out
    images and the answer scores of :func:`score_answers`."""
    recipe = recipes["hybrid"]
    teacher = load_teacher(recipe.teacher)
    models = {"teacher": teacher}
    for name, layout in LAYOUTS.items():
        spec = recipes[name].student
        models[f"seeded {name}"] = seed(teacher, layout, mixer=spec.mixer, seed=spec.seed)
        models[f"distilled {name}"] = load_student(runs[name]["student_dir"])
    tokenizer = tokenizer_for(teacher)
    samples = held_out_samples(recipe, questions)
    scores = score_answers(models, tokenizer, samples)
    rows = []
    for name, model in models.items():
        answers = evaluate_answers(model, tokenizer, samples)
        rows.append(
            {
                "model": name,
                "accuracy": answers["accuracy"],
                "per_kind": answers["per_kind"],
                "questions": answers["questions"],
                **scores[name],
            }
        )
    teacher_acc = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_vs_teacher"] = row["accuracy"] / teacher_acc if teacher_acc else None
    return rows


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
    teacher_dir = resolve_source("builtin:shapes-hovle")
    say(f"[bold]1/4[/] teacher: builtin:shapes-hovle (shipped in the package: {teacher_dir})")
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
        runs[name] = distill(recipe, resume=holds_run(out / name), console=console)
        timings[f"distill_{name}"] = time.perf_counter() - tick
        recipes[name] = recipe

    say("[bold]3/4[/] evaluating teacher, seeded and distilled students on held-out images")
    tick = time.perf_counter()
    rows = _evaluate(recipes, runs, questions)
    timings["evaluate"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    report = {
        "rows": rows,
        "questions": rows[0]["questions"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "runs": {name: _run_summary(r) for name, r in runs.items()},
    }
    say("[bold]4/4[/] done")
    atomic_write_text(out / "demo.json", json.dumps(report, indent=2))
    return report
