"""The CI example (examples/ci): its script converts the tiny teacher end to end, the run's
gates pass and a deliberately failing eval gate exits 4, with one JSON report per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mmdistill.errors import GATES_FAILED

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ci"


def test_the_ci_script_passes_the_run_gates_and_fails_a_deliberately_failing_eval_gate(tmp_path):
    out = tmp_path / "ci"
    env = {
        **os.environ,
        "MMDISTILL": f"{sys.executable} -m mmdistill.cli",
        "EVAL_GATES": "kl<=0.05 top1_agreement>=0.99",
        "OMP_NUM_THREADS": "1",  # tiny models: one thread each, as in the test process
    }
    shrink = [
        f"data.cache_dir={tmp_path / 'data'}",
        "data.shapes={n_train: 16, n_eval: 4, text_lines: 50}",
        *(f"stages.{i}.steps=2" for i in range(3)),
    ]
    done = subprocess.run(
        ["bash", str(EXAMPLE / "convert.sh"), str(EXAMPLE / "recipe.yaml"), str(out), *shrink],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == GATES_FAILED, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "convert: run exited 0" in done.stderr and "convert: eval exited 4" in done.stderr
    # The tiny teacher's students have a vision front-end: no export, and the script says why.
    assert "convert: export skipped: a vision front-end (hovle)" in done.stderr

    run = json.loads((out / "reports" / "run.json").read_text())
    assert run["status"] == "ok" and run["gates"]["passed"]
    assert run["export"]["exportable"] is False
    assert [c["gate"] for c in run["gates"]["checks"]] == ["kl <= 0.05", "ppl_ratio <= 1.1"]
    student = out / "run" / "student"
    assert json.loads((student / "gates.json").read_text())["passed"] is True
    assert json.loads((out / "run" / "report.json").read_text())["gates"] == run["gates"]

    evaluation = json.loads((out / "reports" / "eval.json").read_text())
    assert evaluation["status"] == "gates_failed" and not evaluation["gates"]["passed"]
    verdicts = {c["metric"]: c["passed"] for c in evaluation["gates"]["checks"]}
    assert verdicts == {"kl": True, "top1_agreement": False}
    assert evaluation["gates"]["metrics"]["top1_agreement"] < 0.99
    assert "quality gates failed: top1_agreement" in " ".join(done.stderr.split())


def test_the_workflow_calls_the_script_and_the_recipe_validates():
    workflow = yaml.safe_load((EXAMPLE / "convert.yml").read_text())
    steps = workflow["jobs"]["convert"]["steps"]
    assert any("examples/ci/convert.sh examples/ci/recipe.yaml" in s.get("run", "") for s in steps)
    from mmdistill.recipe import load_recipe

    recipe = load_recipe(EXAMPLE / "recipe.yaml")
    assert recipe.gates.checks and recipe.gate_data
