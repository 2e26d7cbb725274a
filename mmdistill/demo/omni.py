"""The OmniMamba demo: the demo's distilled linear student learns to draw the shapes world.

1. The base student: ``runs/demo/linear/student`` from ``mmdistill demo`` (distilled here with
   the demo recipe if missing).
2. Its understanding (mmu) accuracy on the demo's held-out questions.
3. ``mmdistill/demo/omni_recipe.yaml`` from that student: an image vocabulary (the shipped
   ``builtin:shapes-vq`` tokenizer), task LoRA adapters, then OmniMamba's decoupled stages: t2i
   alone, mmu alone, both together with task-balanced batches.
4. Text-to-image accuracy on the held-out captions (colour, shape, size and cell combinations the
   training split never contains), read back by the shapes checker, and the mmu accuracy again.

Example images (held-out captions) are written to ``OUTPUT_DIR/omni/heldout.png`` with their
captions in ``heldout.txt``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..evaluation import tokenizer_for
from ..files import atomic_write_text
from ..model import DecoderLM, load_student
from ..recipe import load_recipe
from ..t2i_evaluation import evaluate_t2i, image_grid, load_t2i_student, save_png
from ..trainer import distill
from ..training.omni_data import caption_file
from ..training.resume import holds_run
from .pipeline import RECIPE, held_out_samples
from .questions import evaluate_answers

OMNI_RECIPE = Path(__file__).with_name("omni_recipe.yaml")


def base_student(out: Path, overrides: list[str], say) -> Path:
    """The demo's distilled linear student (distilled now if ``out/linear/student`` is missing)."""
    student_dir = out / "linear" / "student"
    if (student_dir / "config.json").is_file():
        say(f"[bold]1/4[/] base student: {student_dir} (from mmdistill demo)")
        return student_dir
    say("[bold]1/4[/] base student: distilling the demo's linear student (about 3 minutes)")
    recipe = load_recipe(
        RECIPE, ["student.attention_layers=none", f"output_dir={out / 'linear'}", *overrides]
    )
    return Path(distill(recipe)["student_dir"])


def mmu_accuracy(model: DecoderLM, questions: int) -> float:
    """Held-out answer accuracy on the demo's question kinds (as ``mmdistill demo`` asks)."""
    model.use_task("mmu")
    samples = held_out_samples(load_recipe(RECIPE), questions)
    return evaluate_answers(model, tokenizer_for(model), samples)["accuracy"]


def write_examples(out: Path, images, captions) -> None:
    save_png(image_grid(images, columns=8, scale=2), out / "heldout.png")
    atomic_write_text(out / "heldout.txt", "".join(f"{c}\n" for c in captions))


def run_omni_demo(
    output_dir: str | Path = "runs/demo",
    overrides: list[str] | None = None,
    questions: int = 240,
    console=None,
) -> dict[str, Any]:
    """Run the OmniMamba demo; the report (also ``output_dir/omni/omni.json``).

    Returns:
        ``{"t2i_accuracy", "t2i_attribute_accuracy", "t2i_train_accuracy",
        "mmu_accuracy_before", "mmu_accuracy_after", "seconds", ...}``.
    """
    out, start = Path(output_dir), time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    base = base_student(out, [], say)
    say("[bold]2/4[/] mmu accuracy of the base student")
    before = mmu_accuracy(load_student(base), questions)
    say("[bold]3/4[/] OmniMamba stages: t2i alone, mmu alone, both (task-balanced)")
    recipe = load_recipe(
        OMNI_RECIPE, [f"student_dir={base}", f"output_dir={out / 'omni'}", *(overrides or [])]
    )
    run = distill(recipe, resume=holds_run(out / "omni"), console=console)
    say("[bold]4/4[/] drawing held-out captions; mmu accuracy after")
    student = load_t2i_student(run["student_dir"])
    held, images, captions = evaluate_t2i(student, caption_file("builtin:shapes-t2i/heldout", None))
    train, _, _ = evaluate_t2i(student, caption_file("builtin:shapes-t2i", None))
    write_examples(out / "omni", images, captions)
    report = {
        "t2i_accuracy": held["exact_match"],
        "t2i_attribute_accuracy": held["attribute_accuracy"],
        "t2i_heldout_captions": held["n"],
        "t2i_train_accuracy": train["exact_match"],
        "mmu_accuracy_before": before,
        "mmu_accuracy_after": mmu_accuracy(student.model, questions),
        "student_dir": run["student_dir"],
        "stages": [
            {k: s[k] for k in ("name", "initial_loss", "final_loss", "steps", "seconds")}
            for s in run["stages"]
        ],
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_text(out / "omni" / "omni.json", json.dumps(report, indent=2))
    return report
