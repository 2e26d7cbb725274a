"""The trainer on the tiny HoVLE-format teacher and a tiny Llama: what each stage trains, that
losses fall, bit-identical resume, non-finite losses, checkpoints and schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_hf_model

import mmdistill
from mmdistill.errors import CheckpointError, TrainingError
from mmdistill.files import read_safetensors
from mmdistill.recipe import ScheduleSpec, load_recipe
from mmdistill.roles import parameter_role
from mmdistill.trainer import distill
from mmdistill.training.checkpoints import latest_checkpoint, list_checkpoints
from mmdistill.training.schedule import lr_multiplier

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


def tiny(out: Path, data_cache: Path, *overrides: str):
    base = [
        f"output_dir={out}",
        f"data.cache_dir={data_cache}",
        "data.shapes={n_train: 64, n_eval: 8, text_lines: 200}",
        "logging.progress=false",
    ]
    return load_recipe(TINY, [*base, *overrides])


def run_collecting(recipe, resume=False, stop_at=None):
    """Run; returns [(stage index, step, loss)] seen by the callback. ``stop_at`` interrupts."""
    seen = []

    def callback(record):
        seen.append((record["stage_index"], record["step"], record["loss"]))
        if stop_at is not None and (record["stage_index"], record["step"]) == stop_at:
            raise KeyboardInterrupt

    try:
        report = distill(recipe, resume=resume, callbacks=[callback])
    except KeyboardInterrupt:
        report = None
    return seen, report


def seeded_student(recipe):
    teacher = mmdistill.load_teacher(recipe.teacher, dtype=recipe.resolved_teacher_dtype)
    return mmdistill.seed(
        teacher,
        attention_layers=recipe.student.attention_layers,
        mixer=recipe.student.mixer,
        seed=recipe.student.seed,
    ).float()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("tiny") / "run"
    recipe = tiny(
        out,
        data_cache,
        "stages.0.steps=24",
        "stages.1.steps=8",
        "stages.2.steps=16",
        "checkpoint.keep=10",
        "checkpoint.every=0",
    )
    return recipe, distill(recipe)


def test_each_stage_changes_exactly_its_trainable_parameters(tiny_run):
    recipe, report = tiny_run
    out = Path(recipe.output_dir)
    before = {k: v.float() for k, v in seeded_student(recipe).state_dict().items()}
    ends = [p for p in list_checkpoints(out / "checkpoints")]
    assert [p.name for p in ends] == [
        "ckpt-00-00000024-stage1-layer-alignment",
        "ckpt-01-00000008-stage2-hidden-matching",
        "ckpt-02-00000016-stage3-end-to-end",
    ]
    for stage, path in zip(recipe.stages, ends, strict=True):
        after = read_safetensors(path)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        expected = {k for k in before if parameter_role(k) in stage.trainable}
        assert changed == expected, stage.name
        before = after
    final = mmdistill.load_student(report["student_dir"]).state_dict()
    assert all(torch.equal(final[k], before[k]) for k in final)


def test_losses_fall(tiny_run):
    recipe, report = tiny_run
    s1, s2, s3 = report["stages"]
    assert [s["steps"] for s in report["stages"]] == [24, 8, 16]
    assert s1["mode"] == s2["mode"] == "layerwise" and s3["mode"] == "end_to_end"
    records = metrics(Path(recipe.output_dir))
    first = [r for r in records if r["stage_index"] == 0]
    assert first[0]["loss"] == s1["initial_loss"] and first[-1]["loss"] == s1["final_loss"]
    # stage 1: the layer MSE (x1000) falls by at least half
    start = sum(r["mse"] for r in first[:2]) / 2
    end = sum(r["mse"] for r in first[-2:]) / 2
    assert end <= 0.5 * start, (start, end)
    # stage 3: the KL falls
    third = [r["kl"] for r in records if r["stage_index"] == 2]
    assert sum(third[-3:]) / 3 < 0.8 * sum(third[:3]) / 3, third
    assert s3["final_parts"]["kl"] == third[-1]
    for stage in report["stages"]:
        assert stage["tokens"] > 0 and stage["seconds"] > 0 and stage["eval_loss"] is not None
        assert stage["skipped"] == {}


def test_run_outputs(tiny_run):
    recipe, report = tiny_run
    out = Path(recipe.output_dir)
    assert report["student_dir"] == str(out / "student")
    assert json.loads((out / "report.json").read_text())["stages"] == report["stages"]
    assert load_recipe(out / "recipe.yaml") == recipe
    assert list((out / "tensorboard").iterdir())
    student = mmdistill.load_student(out / "student")
    assert student.config.layer_types == ["mamba"] * 4
    assert (out / "student" / "tokenizer.model").exists()
    steps = [(r["stage_index"], r["step"]) for r in metrics(out)]
    assert steps == [(0, i) for i in range(1, 25)] + [(1, i) for i in range(1, 9)] + [
        (2, i) for i in range(1, 17)
    ]
    assert latest_checkpoint(out / "checkpoints").name == "ckpt-02-00000016-stage3-end-to-end"


def test_resume_is_bit_identical(tmp_path, data_cache):
    settings = (
        "stages.0.steps=4",
        "stages.1.steps=6",
        "stages.2.steps=4",
        "checkpoint.every=2",
        "checkpoint.keep=2",
    )
    whole, report = run_collecting(tiny(tmp_path / "a", data_cache, *settings))
    cut, _ = run_collecting(tiny(tmp_path / "b", data_cache, *settings), stop_at=(1, 3))
    # interrupted after step 3 of stage 2; the latest checkpoint is after its step 2
    marker = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert marker.name == "ckpt-01-00000002-stage2-hidden-matching"
    assert len(list_checkpoints(tmp_path / "b" / "checkpoints")) == 2  # keep=2
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        distill(tiny(tmp_path / "b", data_cache, *settings))
    rest, resumed = run_collecting(tiny(tmp_path / "b", data_cache, *settings), resume=True)
    assert cut == whole[: len(cut)]
    assert rest == whole[6:]  # 4 steps of stage 1 and 2 of stage 2 were in the checkpoint
    assert [s["final_loss"] for s in resumed["stages"]] == [
        s["final_loss"] for s in report["stages"]
    ]
    assert [s["tokens"] for s in resumed["stages"]] == [s["tokens"] for s in report["stages"]]
    a = mmdistill.load_student(tmp_path / "a" / "student").state_dict()
    b = mmdistill.load_student(tmp_path / "b" / "student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics written after the checkpoint by the interrupted run were dropped on resume
    losses = [(r["stage_index"], r["step"], r["loss"]) for r in metrics(tmp_path / "b")]
    assert losses == whole


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, data_cache, monkeypatch
):
    import mmdistill.objective as stages

    calls = {"n": 0}
    real = stages.layer_mse

    def poisoned(pred, target, mask):
        calls["n"] += 1
        value = real(pred, target, mask)
        return value * float("nan") if calls["n"] > 3 * 4 else value  # 4 layers per step

    monkeypatch.setattr(stages, "layer_mse", poisoned)
    recipe = tiny(tmp_path / "run", data_cache, "stages.0.steps=6", "checkpoint.every=2")
    with pytest.raises(TrainingError) as info:
        distill(recipe)
    message = str(info.value)
    assert "stage 'stage1-layer-alignment' step 4: the loss is not finite (nan)" in message
    kept = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert kept.name == "ckpt-00-00000002-stage1-layer-alignment"
    assert str(kept) in message
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [kept.name]
    assert not (tmp_path / "run" / "student").exists()
    assert TrainingError.exit_code == 3
    assert json.loads((kept / "trainer_state.json").read_text())["step"] == 2


def test_resume_needs_a_checkpoint(tmp_path, data_cache):
    recipe = tiny(tmp_path / "empty", data_cache)
    with pytest.raises(CheckpointError, match="--resume: no complete checkpoint"):
        distill(recipe, resume=True)


def test_hf_llama_end_to_end_stage(tmp_path, llama_dir):
    data = tmp_path / "ids.jsonl"
    g = torch.Generator().manual_seed(0)
    lines = [
        json.dumps({"input_ids": torch.randint(0, 101, (int(n),), generator=g).tolist()})
        for n in torch.randint(5, 40, (50,), generator=g)
    ]
    data.write_text("\n".join(lines) + "\n")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        json.dumps(
            {
                "teacher": str(llama_dir),
                "student": {"attention_layers": "1"},
                "data": {"train": [{"source": str(data)}], "seq_len": 32},
                "stages": [
                    {
                        "name": "e2e",
                        "trainable": ["ssm", "mlp", "norms", "attention"],
                        "loss": {"kl_weight": 1.0, "ce_weight": 0.1, "mse_weight": 10.0},
                        "lr": 1e-3,
                        "tokens": 640,
                        "batch_size": 2,
                        "schedule": {"kind": "cosine", "warmup_steps": 2},
                    }
                ],
                "precision": "fp32",
                "output_dir": str(tmp_path / "out"),
                "logging": {"tensorboard": False, "progress": False},
            }
        )
    )
    recipe = load_recipe(recipe_path)
    report = distill(recipe)
    (stage,) = report["stages"]
    assert stage["steps"] == 10  # ceil(640 tokens / (2 sequences x 32 tokens))
    assert stage["tokens"] == 640  # packed text fills every position
    assert set(stage["final_parts"]) == {"kl", "ce", "mse"}
    before = seeded_student(recipe).state_dict()
    after = mmdistill.load_student(tmp_path / "out" / "student").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    roles = {"ssm", "mlp", "norms", "attention"}
    assert changed == {k for k in before if parameter_role(k) in roles}
    assert any(k.startswith("layers.1.mixer.q_proj") for k in changed)


def test_a_tied_head_student_checkpoints_and_resumes_in_float32(tmp_path):
    """fp32 checkpoints of a student whose head is tied to its embeddings (SmolLM2) failed:
    safetensors refuses one tensor under two names (bf16 hid it by copying)."""
    teacher_dir = tmp_path / "tied"
    write_hf_model(teacher_dir, "llama", tie_word_embeddings=True)
    data = tmp_path / "ids.jsonl"
    rows = torch.randint(0, 101, (20, 40), generator=torch.Generator().manual_seed(0))
    data.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in rows))
    stage = {"name": "e2e", "trainable": ["ssm"], "loss": {"kl_weight": 1.0}, "lr": 1e-3}
    recipe = load_recipe(
        ROOT / "recipes" / "tiny.yaml",
        [
            f"teacher={teacher_dir}",
            f"data.train=[{{source: {data}}}]",
            "data.eval=[]",
            "data.seq_len=32",
            f"stages=[{json.dumps({**stage, 'steps': 4, 'batch_size': 2})}]",
            "checkpoint={every: 2, keep: 2}",
            "logging.progress=false",
            f"output_dir={tmp_path / 'out'}",
        ],
    )

    def stop(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(recipe, callbacks=[stop])
    report = distill(recipe, resume=True)
    student = mmdistill.load_student(report["student_dir"])
    assert student.lm_head.weight is student.front.embed_tokens.weight


def test_lr_schedules():
    wsd = lr_multiplier(ScheduleSpec(kind="wsd", warmup_steps=2, decay_steps=4), 10)
    assert [wsd(i) for i in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    floor = lr_multiplier(ScheduleSpec(kind="wsd", decay_ratio=0.5, min_lr_ratio=0.2), 4)
    assert [floor(i) for i in range(4)] == pytest.approx([1, 1, 1, 0.6])
    cosine = lr_multiplier(ScheduleSpec(kind="cosine", warmup_ratio=0.25), 8)
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (i - 2) / 6)) for i in range(2, 8)]
    assert [cosine(i) for i in range(8)] == pytest.approx(expected)
    constant = lr_multiplier(ScheduleSpec(kind="constant", warmup_steps=0), 3)
    assert [constant(i) for i in range(3)] == [1.0, 1.0, 1.0]
