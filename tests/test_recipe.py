"""Recipes: schema validation with key-path errors, dotlist overrides, and the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmdistill.errors import RecipeError
from mmdistill.recipe import apply_overrides, load_recipe, parse_value, validate_recipe
from mmdistill.roles import ROLES

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

MINIMAL = {
    "teacher": "builtin:tiny-hovle",
    "output_dir": "runs/x",
    "data": {"train": [{"source": "builtin:shapes"}]},
    "stages": [
        {"name": "s1", "trainable": ["ssm"], "loss": {"mse_weight": 1000}, "lr": 1e-3, "steps": 5}
    ],
}


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_types(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    stage = recipe.stages[0]
    assert stage.lr == 1e-3 and stage.steps == 5 and stage.tokens is None
    assert stage.loss.layerwise and stage.loss.mse_weight == 1000.0
    assert stage.schedule.kind == "wsd" and stage.clip_grad == 1.0 and stage.grad_accum == 1
    assert recipe.precision == "bf16" and recipe.resolved_teacher_dtype == "bfloat16"
    assert recipe.data.seq_len == 2048 and recipe.data.packing is True
    assert recipe.checkpoint.keep == 2 and recipe.distributed.deepspeed is None


def test_yaml_reads_exponent_floats(tmp_path):
    path = tmp_path / "r.yaml"
    text = yaml.safe_dump(MINIMAL).replace("lr: 0.001", "lr: 5e-5")
    assert "lr: 5e-5" in text
    path.write_text(text)
    assert load_recipe(path).stages[0].lr == 5e-5


def test_overrides_follow_dotlist_semantics(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(
        path,
        [
            "stages.0.lr=2e-3",
            "stages.0.schedule.kind=cosine",
            "student.attention_layers=every:2",
            "data.train=[{source: a.txt, weight: 2}, {source: builtin:shapes/text}]",
            "output_dir=runs/y",
            "distributed.deepspeed=null",
            "stages.0.trainable=[ssm, qkv]",
        ],
    )
    assert recipe.stages[0].lr == 2e-3
    assert recipe.stages[0].schedule.kind == "cosine"
    assert recipe.student.attention_layers == "every:2"
    assert [(s.source, s.weight) for s in recipe.data.train] == [
        ("a.txt", 2.0),
        ("builtin:shapes/text", 1.0),
    ]
    assert recipe.output_dir == "runs/y"
    assert recipe.stages[0].trainable == ["ssm", "qkv"]


def test_apply_overrides_copies_and_creates_sections():
    data = {"a": {"b": 1}, "l": [{"x": 1}]}
    out = apply_overrides(data, ["a.c.d=3", "l.0.x=2"])
    assert out == {"a": {"b": 1, "c": {"d": 3}}, "l": [{"x": 2}]}
    assert data == {"a": {"b": 1}, "l": [{"x": 1}]}


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("10", 10), ("true", True), ("null", None), ("[1, 2]", [1, 2]), ("x", "x")],
)
def test_parse_value(text, value):
    assert parse_value(text) == value


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.0.lrr=1", r"stages\.0\.lrr: unknown key"),
        ("stages.0.lr=abc", r"stages\.0\.lr: Input should be a valid number"),
        ("stages.0.lr=-1", r"stages\.0\.lr: Input should be greater than 0"),
        ("stages.3.lr=1", r"stages\.3: index 3 is out of range \(stages has 1 entries\)"),
        ("stages.x.lr=1", r"stages\.x: stages is a list; use an index"),
        ("output_dir.x=1", r"output_dir\.x: output_dir is a value, not a section"),
        (
            "stages.0.trainable=[mlp]",
            r"stages\.0\.trainable: \['mlp'\] cannot train in a layer-wise",
        ),
        ("stages.0.trainable=[ssm, bogus]", r"stages\.0\.trainable\.1: Input should be 'ssm'"),
        ("stages.0.tokens=100", r"stages\.0\.tokens: set exactly one of 'steps' and 'tokens'"),
        ("stages.0.loss.mse_weight=0", r"stages\.0\.loss: give at least one positive weight"),
        ("student.mixer={conv_kernel: 0}", r"student\.mixer: conv_kernel must be a positive"),
        ("student.mixer={head_dim: 4}", r"student\.mixer: head_dim come\(s\) from the teacher"),
        ("student.mixer={bogus: 1}", r"student\.mixer: unknown mixer option\(s\) \['bogus'\]"),
        ("student.attention_layers=every:0", r"student\.attention_layers: .*every:K"),
        ("data.train.0.source=a.csv", r"data\.train\.0\.source: 'a\.csv': data files must end"),
        ("data.train.0.source=builtin:nope", r"data\.train\.0\.source: unknown built-in data"),
        ("distributed.deepspeed=missing.json", r"distributed\.deepspeed: DeepSpeed config not"),
        ("precision=fp16", r"precision: Input should be 'fp32' or 'bf16'"),
        ("teacher=null", r"give exactly one of 'teacher' \(seed a student\) and 'student_dir'"),
        ("stages=[]", r"stages: List should have at least 1 item"),
        ("nonsense", r"override 'nonsense' is not key=value"),
    ],
)
def test_errors_name_the_key(tmp_path, override, message):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, [override])


def test_missing_required_keys_and_duplicate_stage_names():
    data = {k: v for k, v in MINIMAL.items() if k != "teacher"}
    with pytest.raises(RecipeError, match=r"give exactly one of 'teacher'"):
        validate_recipe(data)
    twice = dict(MINIMAL, stages=MINIMAL["stages"] * 2)
    with pytest.raises(RecipeError, match=r"stage names must be unique; repeated: \['s1'\]"):
        validate_recipe(twice)


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(bad)


def test_deepspeed_config_is_checked(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match=r"distributed\.deepspeed: .*is not valid JSON"):
        load_recipe(write(tmp_path, MINIMAL), [f"distributed.deepspeed={bad}"])
    bad.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    with pytest.raises(RecipeError, match=r"zero_optimization\.stage must be 0-3"):
        load_recipe(write(tmp_path, MINIMAL), [f"distributed.deepspeed={bad}"])


def test_missing_files_are_listed_not_fatal(tmp_path):
    recipe = load_recipe(
        write(tmp_path, MINIMAL), ["data.eval=[{source: nope.jsonl, image_root: nodir}]"]
    )
    assert recipe.missing_files() == [
        "data.eval.0.source: file not found: nope.jsonl",
        "data.eval.0.image_root: not a directory: nodir",
    ]


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    assert recipe.stages
    for stage in recipe.stages:
        assert set(stage.trainable) <= set(ROLES)
    if recipe.distributed.deepspeed:
        assert (ROOT / recipe.distributed.deepspeed).is_file()


def test_shipped_recipe_set_and_mmmamba_values(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "linear.yaml", "hybrid.yaml"}
    linear = load_recipe(ROOT / "recipes" / "linear.yaml")
    hybrid = load_recipe(ROOT / "recipes" / "hybrid.yaml")
    assert linear.teacher == hybrid.teacher == "hovle"
    assert linear.student.attention_layers == "none"
    assert hybrid.student.attention_layers == "every:4"
    for recipe in (linear, hybrid):
        s1, s2, s3 = recipe.stages
        assert (s1.lr, s2.lr, s3.lr) == (1e-3, 5e-4, 5e-5)
        assert s1.trainable == ["ssm"] and sorted(s2.trainable) == ["qkv", "ssm"]
        assert s1.loss.mse_weight == s2.loss.mse_weight == 1000
        assert s1.loss.layerwise and s2.loss.layerwise
        assert s3.loss.kl_weight == 1 and s3.loss.kl_temperature == 1 and not s3.loss.layerwise
        assert s1.schedule.kind == "wsd"
        assert recipe.data.seq_len == 8192 and recipe.precision == "bf16"


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_shipped_deepspeed_configs(name):
    config = json.loads((ROOT / "recipes" / name).read_text())
    assert config["zero_optimization"]["stage"] == int(name[4])
    assert "optimizer" not in config and "scheduler" not in config


OMNI_STAGE = {"name": "joint", "task": "both", "trainable": ["lora"], "lr": 1e-4, "steps": 2}
OMNI = {"t2i": [{"source": "builtin:shapes-t2i"}]}


def test_task_stages():
    recipe = validate_recipe(
        dict(
            MINIMAL,
            omni=OMNI,
            stages=[*MINIMAL["stages"], dict(OMNI_STAGE, task_ratio={"mmu": 3, "t2i": 48})],
        )
    )
    joint = recipe.stages[1]
    assert joint.tasks == ("mmu", "t2i") and joint.rows("t2i") == 48 and joint.rows("mmu") == 3
    assert (
        recipe.omni.lora.r == 8
        and recipe.omni.lora.alpha == 32
        and recipe.omni.lora.dropout == 0.05
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task_ratio": {"mmu": 0, "t2i": 0}}, r"task_ratio is 0:0"),
        ({}, r"give task_ratio .* exactly for task: both"),
        ({"task_ratio": {"mmu": 1, "t2i": 1}, "loss": {"ce_weight": 1}}, r"loss is fixed"),
    ],
)
def test_task_stage_errors(change, message):
    data = dict(MINIMAL, omni=OMNI, stages=[dict(OMNI_STAGE, **change)])
    with pytest.raises(RecipeError, match=message):
        validate_recipe(data)


def test_recipe_level_task_errors():
    ratio = {"task_ratio": {"mmu": 1, "t2i": 1}}
    with pytest.raises(RecipeError, match=r"add an 'omni' section"):
        validate_recipe(dict(MINIMAL, stages=[dict(OMNI_STAGE, **ratio)]))
    from_student = {k: v for k, v in MINIMAL.items() if k != "teacher"}
    with pytest.raises(RecipeError, match=r"stages \['s1'\] distil from a teacher"):
        validate_recipe(dict(from_student, student_dir="runs/s"))
