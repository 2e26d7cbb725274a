"""``mmdistill run`` / ``mmdistill validate``: exit codes, early recipe errors, the JSON report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import mmdistill
from mmdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["mmdistill", *args])
    try:
        main()
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code
    return 0


@pytest.fixture
def no_teacher(monkeypatch):
    """Fail the test if anything tries to load a teacher."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(mmdistill, "load_teacher", forbidden)
    monkeypatch.setattr(mmdistill.teachers, "load_teacher", forbidden)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_validate_shipped_recipes(path, monkeypatch, capfd, no_teacher):
    monkeypatch.chdir(ROOT)
    assert cli(monkeypatch, "validate", str(path.relative_to(ROOT)), "--json") == 0
    out, err = capfd.readouterr()
    document = json.loads(out)
    assert document["stages"] and (document["teacher"] or document["student_dir"])
    assert "valid" in err


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["stages.0.lr=abc"], "stages.0.lr: Input should be a valid number"),
        (["stages.1.loss.kl_weight=-1"], "stages.1.loss.kl_weight: Input should be greater"),
        (["stages.9.lr=1"], "stages.9: index 9 is out of range"),
        (["data.shapez={}"], "data.shapez: unknown key"),
        (["student.attention_layers=3"], "write [3] to keep attention in layer 3, or every:3"),
    ],
)
def test_malformed_recipe_exits_2_before_the_teacher(
    monkeypatch, capfd, no_teacher, tmp_path, command, extra, message
):
    code = cli(monkeypatch, command, str(ROOT / "recipes" / "tiny.yaml"), *extra)
    out, err = capfd.readouterr()
    assert code == 2
    assert message in " ".join(err.split())
    assert "Traceback" not in err and out == ""


def test_malformed_file_and_missing_data_exit_2(monkeypatch, capfd, no_teacher, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes" / "tiny.yaml").read_text().replace("lr: 1.0e-2", "lrate: 1"))
    assert cli(monkeypatch, "run", str(bad)) == 2
    assert "stages.0.lrate: unknown key" in " ".join(capfd.readouterr().err.split())
    code = cli(
        monkeypatch,
        "run",
        str(ROOT / "recipes" / "tiny.yaml"),
        f"output_dir={tmp_path / 'out'}",
        "data.train=[{source: missing.jsonl}]",
    )
    assert code == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "data.train.0.source: file not found: missing.jsonl" in err
    assert not (tmp_path / "out").exists()


def common(tmp_path: Path) -> list[str]:
    return [
        str(ROOT / "recipes" / "tiny.yaml"),
        f"output_dir={tmp_path / 'out'}",
        f"data.cache_dir={tmp_path / 'data'}",
        "data.shapes={n_train: 16, n_eval: 4, text_lines: 50}",
        "stages.0.steps=2",
        "stages.1.steps=2",
        "stages.2.steps=2",
    ]


def test_run_json_prints_one_document(monkeypatch, capfd, tmp_path):
    assert cli(monkeypatch, "run", *common(tmp_path), "--json") == 0
    out, err = capfd.readouterr()
    report = json.loads(out)  # the whole of stdout is one JSON document
    assert report["student_dir"] == str(tmp_path / "out" / "student")
    assert [s["name"] for s in report["stages"]] == [
        "stage1-layer-alignment",
        "stage2-hidden-matching",
        "stage3-end-to-end",
    ]
    for stage in report["stages"]:
        assert {"name", "initial_loss", "final_loss", "steps", "tokens", "seconds"} <= set(stage)
        assert stage["steps"] == 2 and stage["tokens"] > 0
    assert "distilled student" in err
    mmdistill.load_student(report["student_dir"])
    # a second run into the same directory needs --resume; with it, nothing is left to do
    assert cli(monkeypatch, "run", *common(tmp_path)) == 2
    assert "already holds a run; pass --resume" in " ".join(capfd.readouterr().err.split())
    assert cli(monkeypatch, "run", *common(tmp_path), "--resume", "--json") == 0
    again = json.loads(capfd.readouterr().out)
    assert [s["final_loss"] for s in again["stages"]] == [s["final_loss"] for s in report["stages"]]
    assert report["status"] == again["status"] == "ok" and "gates" not in again


def test_a_failed_gate_exits_4_and_keeps_the_student_marked_failing(monkeypatch, capfd, tmp_path):
    gates = ["--gate", "kl<=100", "--gate", "top1_agreement>=0.999"]
    assert cli(monkeypatch, "run", *common(tmp_path), *gates, "--json") == 4
    out, err = capfd.readouterr()
    report = json.loads(out)  # still one JSON document, the whole report
    assert report["status"] == "gates_failed" and report["gates"]["passed"] is False
    checks = report["gates"]["checks"]
    assert [(c["gate"], c["passed"]) for c in checks] == [
        ("kl <= 100", True),
        ("top1_agreement >= 0.999", False),
    ]
    assert checks[1]["value"] == report["gates"]["metrics"]["top1_agreement"] < 0.999
    student = Path(report["student_dir"])
    assert json.loads((student / "gates.json").read_text())["passed"] is False
    assert json.loads((tmp_path / "out" / "report.json").read_text())["status"] == "gates_failed"
    mmdistill.load_student(student)  # written and loadable
    assert "quality gates failed: top1_agreement" in " ".join(err.split())
    # the run is complete: --resume only checks the gates again; without --gate they pass
    assert cli(monkeypatch, "run", *common(tmp_path), "--resume", "--gate", "kl<=100") == 0
    assert json.loads((student / "gates.json").read_text())["passed"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gate", "kl=0.1"], "is not METRIC OP NUMBER"),
        (["--gate", "loss<=1"], "unknown metric 'loss'"),
        (["gates.checks=[kl<=1]", "data.eval=[]"], "gates need held-out data"),
    ],
)
def test_a_bad_gate_exits_2_before_anything_loads(
    monkeypatch, capfd, tmp_path, no_teacher, args, message
):
    assert cli(monkeypatch, "run", *common(tmp_path), *args, "--json") == 2
    out, err = capfd.readouterr()
    document = json.loads(out)
    assert document["status"] == "error" and document["exit_code"] == 2
    assert message in document["error"]["message"] and document["error"]["hint"]
    assert message in " ".join(err.split()) and "hint:" in err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_a_run_exits_5_says_what_is_kept_and_resumes(
    monkeypatch, capfd, tmp_path
):
    import mmdistill.training.checkpoints as checkpoints

    real = checkpoints.save_sharded
    calls = []

    def fills_up(tensors, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:  # the second stage's checkpoint
            (Path(directory) / "model.safetensors").write_bytes(b"x" * 4096)
            raise OSError(28, "No space left on device")
        return real(tensors, directory, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_sharded", fills_up)
    assert cli(monkeypatch, "run", *common(tmp_path), "--json") == 5
    out, err = capfd.readouterr()
    document = json.loads(out)
    assert document["exit_code"] == 5 and document["error"]["type"] == "ResourceError"
    assert "disk full while writing" in document["error"]["message"]
    assert "MiB left on its filesystem" in document["error"]["message"]
    assert "--resume" in document["error"]["hint"] and "Traceback" not in err
    kept = document["completed"]
    assert kept["stages"] == ["stage1-layer-alignment"]
    assert Path(kept["last_checkpoint"]).name.startswith("ckpt-00-")
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == sorted(["latest", Path(kept["last_checkpoint"]).name])  # no temp folder
    assert not (tmp_path / "out" / "student").exists()
    monkeypatch.setattr(checkpoints, "save_sharded", real)
    assert cli(monkeypatch, "run", *common(tmp_path), "--resume", "--json") == 0
    resumed = json.loads(capfd.readouterr().out)
    assert [s["name"] for s in resumed["stages"]][0] == "stage1-layer-alignment"


def test_out_of_memory_exits_5_with_one_message(monkeypatch, capfd, tmp_path, no_teacher):
    import mmdistill.commands.run_cmd as run_cmd

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(run_cmd, "distill", oom)
    assert cli(monkeypatch, "run", *common(tmp_path), "--json") == 5
    out, err = capfd.readouterr()
    document = json.loads(out)
    assert document["error"]["type"] == "OutOfMemoryError"
    assert document["error"]["message"] == (
        "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert "Traceback" not in err


def test_a_usage_error_with_json_still_prints_one_document(monkeypatch, capfd):
    assert cli(monkeypatch, "run", "recipe.yaml", "--bogus", "--json") == 2
    out, err = capfd.readouterr()
    document = json.loads(out)
    assert document["error"]["type"] == "UsageError"
    assert document["error"]["message"] == "No such option: --bogus"
    assert "run --help" in document["error"]["hint"] and "No such option" in err


def test_the_readme_lists_every_exit_code():
    from mmdistill.errors import EXIT_CODES

    readme = (ROOT / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in readme


def test_non_finite_loss_exits_3(monkeypatch, capfd, tmp_path):
    import mmdistill.objective as objective

    monkeypatch.setattr(objective, "layer_mse", lambda *a: torch.tensor(float("inf")))
    assert cli(monkeypatch, "run", *common(tmp_path)) == 3
    err = " ".join(capfd.readouterr().err.split())
    assert "step 1: the loss is not finite (inf)" in err
    assert "no checkpoint had been written yet" in err
    assert "Lower stages.0.lr (now 0.01), lower clip_grad (now 1.0)" in err
    assert "without --resume: there is nothing to resume" in err
    # with --json the failure is still one JSON document on stdout
    assert cli(monkeypatch, "run", *common(tmp_path), "--json") == 3
    document = json.loads(capfd.readouterr().out)
    assert document["status"] == "error" and document["exit_code"] == 3
    assert document["error"]["type"] == "TrainingError"
    assert "is not finite" in document["error"]["message"]
    assert document["completed"] == {"stages": [], "last_checkpoint": None}


def test_resume_without_checkpoint_exits_2(monkeypatch, capfd, tmp_path, no_teacher):
    assert cli(monkeypatch, "run", *common(tmp_path), "--resume") == 2
    assert "--resume: no complete checkpoint" in " ".join(capfd.readouterr().err.split())


def test_seed_out_naming_a_file_exits_2_and_keeps_it(monkeypatch, capfd, tmp_path, no_teacher):
    target = tmp_path / "student.txt"
    target.write_text("mine")
    assert cli(monkeypatch, "seed", "--teacher", "x", "--out", str(target)) == 2
    assert "is a file" in " ".join(capfd.readouterr().err.split())
    assert target.read_text() == "mine"


def test_ctrl_c_inside_a_command_says_interrupted_and_exits_130(monkeypatch, capfd, tmp_path):
    import mmdistill.commands.seed_cmd as seed_cmd

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(seed_cmd, "load_teacher", interrupted)
    assert cli(monkeypatch, "seed", "--teacher", "x", "--out", str(tmp_path / "s")) == 130
    assert "interrupted" in capfd.readouterr().err


def test_a_layer_index_past_the_teacher_exits_2_before_anything_loads_or_is_written(
    monkeypatch, capfd, tmp_path, no_teacher
):
    out = tmp_path / "out"
    args = ["run", str(ROOT / "recipes" / "tiny.yaml"), f"output_dir={out}"]
    assert cli(monkeypatch, *args, "student.attention_layers=[1,99]") == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "student.attention_layers" in err and "99" in err
    assert not out.exists()


def test_seed_force_replaces_only_a_student_it_wrote(monkeypatch, capfd, tmp_path, llama_dir):
    out = tmp_path / "student"
    args = ["seed", "--teacher", str(llama_dir), "--out", str(out)]
    assert cli(monkeypatch, *args) == 0
    assert cli(monkeypatch, *args, "--force") == 0  # a student it wrote: replaced
    (out / "notes.txt").write_text("mine")
    assert cli(monkeypatch, *args, "--force") == 2
    assert "files mmdistill did not write (notes.txt)" in " ".join(capfd.readouterr().err.split())
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    assert (
        cli(monkeypatch, "seed", "--teacher", str(llama_dir), "--out", str(other), "--force") == 2
    )
    assert (other / "data.csv").exists()


def test_a_full_disk_during_seed_exits_5_and_keeps_the_old_student(
    monkeypatch, capfd, tmp_path, llama_dir
):
    """safetensors reports ENOSPC as a SafetensorError (not an OSError), as here."""
    from safetensors import SafetensorError

    import mmdistill.files as files

    out = tmp_path / "student"
    args = ["seed", "--teacher", str(llama_dir), "--out", str(out)]
    assert cli(monkeypatch, *args) == 0
    before = (out / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(files, "save_file", full)
    assert cli(monkeypatch, *args, "--force") == 5
    err = " ".join(capfd.readouterr().err.split())
    assert "disk full while writing" in err and "MiB left on its filesystem" in err
    assert "keeps what it held" in err and "Traceback" not in err
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary folder left


@pytest.mark.parametrize("command", ["bench", "run", "seed", "eval", "generate", "demo"])
def test_help_is_readable_at_80_columns(monkeypatch, capfd, command):
    monkeypatch.setenv("COLUMNS", "80")
    assert cli(monkeypatch, command, "--help") == 0
    out = capfd.readouterr().out
    assert out.startswith("Usage:") and "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
