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


def test_a_full_disk_during_seed_exits_2_and_keeps_the_old_student(
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
    assert cli(monkeypatch, *args, "--force") == 2
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
