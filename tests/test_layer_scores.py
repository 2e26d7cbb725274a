"""Per-layer scores for ``--attention-layers auto:K``: each restored layer's KL equals the KL of a
hybrid built explicitly with that one attention layer; budgets parse or fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

import mmdistill
from mmdistill.attention_layers import auto_budget, parse_attention_layers
from mmdistill.layer_scores import LayerScores, score_layers
from mmdistill.metrics import token_kl

ROOT = Path(__file__).resolve().parents[1]


def batches(vocab: int, n: int = 2):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 24), generator=g)
        scored = torch.ones(2, 24, dtype=torch.bool)
        scored[1, 20:] = False  # padding-like positions are not scored
        out.append((ids, None, scored))
    return out


@pytest.fixture(scope="module")
def linear(llama_teacher):
    """A linear student whose MLPs differ from the teacher's (as after end-to-end training)."""
    student = mmdistill.seed(llama_teacher, attention_layers="none").float()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".mlp." in name or ".mixer." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return student.eval()


def explicit_hybrid(teacher, linear, layer: int):
    """Layer ``layer`` from the teacher, everything else from the linear student."""
    hybrid = mmdistill.seed(teacher, attention_layers=str(layer)).float()
    state = hybrid.state_dict()
    mine = linear.state_dict()
    for key in state:
        if not key.startswith(f"layers.{layer}."):
            state[key] = mine[key]
    hybrid.load_state_dict(state)
    return hybrid.eval()


def test_each_restored_layer_equals_an_explicit_hybrid(llama_teacher, linear):
    data = batches(llama_teacher.config.vocab_size)
    scores = score_layers(llama_teacher, linear, data)
    assert scores.tokens == 2 * (48 - 4)
    for layer in range(len(linear.layers)):
        model = explicit_hybrid(llama_teacher, linear, layer)
        total = 0.0
        with torch.no_grad():
            for ids, _, scored in data:
                kl = token_kl(model(ids).logits[scored], llama_teacher(ids).logits[scored])
                total += float(kl.sum())
        assert scores.restored_kl[layer] == pytest.approx(total / scores.tokens, rel=1e-4)
    assert scores.gains == pytest.approx([scores.linear_kl - k for k in scores.restored_kl])
    assert score_layers(llama_teacher, linear, data).to_dict() == scores.to_dict()
    assert linear.config.layer_types == ["mamba"] * 4  # the student is left as it was
    # Per batch: the batches' KLs, weighted by their scored tokens, give the totals.
    assert scores.batch_tokens == [44, 44]
    weights = [n / scores.tokens for n in scores.batch_tokens]
    by_batch = [
        sum(w * k for w, k in zip(weights, ks, strict=True)) for ks in scores.restored_by_batch
    ]
    assert by_batch == pytest.approx(scores.restored_kl, rel=1e-6)
    linear_total = sum(w * k for w, k in zip(weights, scores.linear_by_batch, strict=True))
    assert linear_total == pytest.approx(scores.linear_kl, rel=1e-6)


def explicit_kl(teacher, model, data) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, _, scored in data:
            total += float(token_kl(model(ids).logits[scored], teacher(ids).logits[scored]).sum())
            tokens += int(scored.sum())
    return total / tokens


def test_greedy_search_picks_what_explicit_hybrids_say(llama_teacher, linear):
    """Each round's pick is the layer whose restoration, with the earlier picks restored,
    gives the lowest KL, each KL computed on a hybrid built explicitly (full forwards)."""
    from mmdistill.layer_scores import search_layers, with_attention

    data = batches(llama_teacher.config.vocab_size)
    found = search_layers(llama_teacher, linear, data, budget=3)
    assert found.first.to_dict() == score_layers(llama_teacher, linear, data).to_dict()
    assert found.order[0] == found.first.ranking()[0]
    for round_, layer in enumerate(found.order):
        picked = found.order[:round_]
        kls = {
            i: explicit_kl(llama_teacher, with_attention(linear, llama_teacher, picked + [i]), data)
            for i in range(len(linear.layers))
            if i not in picked
        }
        assert layer == min(kls, key=lambda i: (kls[i], i))
        assert found.kl_after[round_] == pytest.approx(kls[layer], rel=1e-4)
    layout = found.layout("auto:3", 3, "stage3")
    assert layout["chosen"] == sorted(found.order) and layout["search"] == "greedy"
    assert search_layers(llama_teacher, linear, data, budget=3).order == found.order
    assert linear.config.layer_types == ["mamba"] * 4  # the student is left as it was


def test_choose_takes_the_largest_gains_in_layer_order():
    scores = LayerScores(1.0, [0.9, 0.5, 0.95, 0.5], 10)
    assert scores.ranking() == [1, 3, 0, 2]
    assert scores.choose(2) == [1, 3]
    assert scores.choose(3) == [0, 1, 3]


def spread_scores(gains: list[float], noise: list[float]) -> LayerScores:
    """Scores over two batches whose gains are ``gain ± noise`` (a standard error of
    ``noise``: the two batches differ by twice it)."""
    restored = [[1.0 - g - d, 1.0 - g + d] for g, d in zip(gains, noise, strict=True)]
    totals = [sum(pair) / 2 for pair in restored]
    return LayerScores(1.0, totals, 20, [10, 10], [1.0, 1.0], restored)


def test_clear_gains_are_those_above_two_standard_errors():
    scores = spread_scores([0.30, 0.05, 0.20, -0.10, 0.01], [0.01, 0.04, 0.05, 0.01, 0.001])
    assert scores.gain_errors() == pytest.approx([0.01, 0.04, 0.05, 0.01, 0.001])
    assert scores.clear() == [0, 2, 4]  # 0.05 < 2 x 0.04; a negative gain is never clear
    one_batch = LayerScores(1.0, [0.7, 1.1, 0.9], 10)
    assert one_batch.gain_errors() is None and one_batch.clear() == [0, 2]


@pytest.mark.parametrize(
    "spec,budget", [("auto:2", 2), ("auto:50%", 2), ("auto:10%", 1), ("AUTO:4", 4)]
)
def test_auto_budgets(spec, budget):
    assert auto_budget(spec, 4) == budget


@pytest.mark.parametrize("spec", ["auto:0", "auto:5", "auto:-10%", "auto:0%", "auto:x", "auto:"])
def test_impossible_budgets_are_one_clear_error(spec):
    with pytest.raises(ValueError, match="auto"):
        auto_budget(spec, 4)


def test_auto_needs_a_measurement_to_become_layers():
    assert auto_budget("every:2", 4) is None
    with pytest.raises(ValueError, match="picks layers by measurement"):
        parse_attention_layers("auto:2", 4)


def auto_recipe(out, cache, *overrides):
    from mmdistill.recipe import load_recipe

    return load_recipe(
        ROOT / "recipes" / "tiny.yaml",
        [
            f"output_dir={out}",
            f"data.cache_dir={cache}",
            "data.shapes={n_train: 32, n_eval: 8, text_lines: 100}",
            "logging.progress=false",
            "student.attention_layers=auto:2",
            "student.layout_batches=2",
            "stages.0.steps=3",
            "stages.1.steps=2",
            "stages.2.steps=3",
            "checkpoint={every: 1, keep: 20}",
            *overrides,
        ],
    )


def test_a_run_with_auto_scores_after_the_layerwise_stages_and_resumes(tmp_path):
    from mmdistill.files import read_safetensors
    from mmdistill.trainer import distill
    from mmdistill.training.checkpoints import CHECKPOINTS, list_checkpoints

    recipe = auto_recipe(tmp_path / "run", tmp_path / "cache")
    report = distill(recipe)
    layout = report["layout"]
    assert layout["spec"] == "auto:2" and layout["before_stage"] == "stage3-end-to-end"
    assert layout["chosen"] == sorted(layout["scores"]["ranking"][:2])
    student = mmdistill.load_student(report["student_dir"])
    kept = [i for i, t in enumerate(student.config.layer_types) if t == "attention"]
    assert kept == layout["chosen"] and student.config.layout == layout
    scores = LayerScores(**{k: layout["scores"][k] for k in LayerScores.__dataclass_fields__})
    assert len(scores.batch_tokens) == 2 and layout["scores"]["gain_errors"] == scores.gain_errors()
    assert layout["scores"]["clear"] == scores.clear()
    # The layer-wise stages trained a linear student; the last stage trained the hybrid.
    checkpoints = list_checkpoints(tmp_path / "run" / CHECKPOINTS)
    stage2_end = [c for c in checkpoints if "stage2" in c.name][-1]
    assert "attention" not in mmdistill.load_student(stage2_end).config.layer_types

    first = read_safetensors(report["student_dir"])
    for at in [(1, 1), (2, 2)]:  # before the choice (it is made again) and after it

        def stop(record, at=at):
            if (record["stage_index"], record["step"]) == at:
                raise KeyboardInterrupt

        again = tmp_path / f"again-{at[0]}"
        with pytest.raises(KeyboardInterrupt):
            distill(auto_recipe(again, tmp_path / "cache"), callbacks=[stop])
        resumed = distill(auto_recipe(again, tmp_path / "cache"), resume=True)
        timeless = {k: v for k, v in layout.items() if k != "seconds"}
        assert {k: v for k, v in resumed["layout"].items() if k != "seconds"} == timeless
        second = read_safetensors(resumed["student_dir"])
        for key in first:
            torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, msg=key)


def test_a_run_with_a_greedy_search_keeps_its_picks(tmp_path):
    from mmdistill.trainer import distill

    report = distill(
        auto_recipe(tmp_path / "run", tmp_path / "cache", "student.layout_search=greedy")
    )
    layout = report["layout"]
    assert layout["search"] == "greedy" and len(layout["order"]) == 2
    assert layout["chosen"] == sorted(layout["order"]) and len(layout["kl_after"]) == 2
    assert layout["order"][0] == layout["scores"]["ranking"][0]
    student = mmdistill.load_student(report["student_dir"])
    kept = [i for i, t in enumerate(student.config.layer_types) if t == "attention"]
    assert kept == layout["chosen"]


def test_layout_before_a_later_stage_scores_after_the_stages_before_it(tmp_path):
    """Naming the end-to-end stage's successor: the linear student trains end to end first."""
    from mmdistill.recipe import StageSpec
    from mmdistill.trainer import distill

    recipe = auto_recipe(tmp_path / "run", tmp_path / "cache")
    short = StageSpec(**{**recipe.stages[2].model_dump(), "name": "linear-e2e", "steps": 2})
    stages = [*recipe.stages[:2], short, recipe.stages[2]]
    recipe = recipe.model_copy(
        update={
            "stages": stages,
            "student": recipe.student.model_copy(update={"layout_before": "stage3-end-to-end"}),
        }
    )
    report = distill(recipe)
    assert report["layout"]["before_stage"] == "stage3-end-to-end"
    student = mmdistill.load_student(report["student_dir"])
    kept = [i for i, t in enumerate(student.config.layer_types) if t == "attention"]
    assert kept == report["layout"]["chosen"] and len(kept) == 2


@pytest.mark.parametrize(
    "override,message",
    [
        ("student.layout_before=nowhere", "no stage named 'nowhere'"),
        ("student.layout_search=best", "layout_search"),
    ],
)
def test_bad_layout_options_are_refused_before_anything_loads(tmp_path, override, message):
    from mmdistill.errors import RecipeError

    with pytest.raises(RecipeError, match=message):
        auto_recipe(tmp_path / "run", tmp_path / "cache", override)


def test_layout_before_needs_an_auto_layout(tmp_path):
    from mmdistill.errors import RecipeError

    with pytest.raises(RecipeError, match="auto:K attention layers only"):
        auto_recipe(
            tmp_path / "run",
            tmp_path / "cache",
            "student.attention_layers=every:2",
            "student.layout_before=stage3-end-to-end",
        )


def test_auto_needs_a_teacher_to_restore_from(tmp_path):
    from mmdistill.errors import RecipeError
    from mmdistill.trainer import check_layout

    recipe = auto_recipe(tmp_path / "run", tmp_path / "cache", "student.attention_layers=auto:99")
    with pytest.raises(RecipeError, match="auto:K needs 1 <= K <="):
        check_layout(recipe)


def test_cli_layout_ranks_plots_and_refuses_impossible_budgets(
    chat_llama, tmp_path, monkeypatch, capfd
):
    import json

    directory, _, _ = chat_llama
    text = tmp_path / "calibration.txt"
    text.write_text("".join(f"The {i} cats sat on the mat, and it rained.\n" for i in range(40)))

    def cli(*args):
        return run_cli(monkeypatch, capfd, "layout", *args)

    base = ["--teacher", str(directory), "--data", str(text), "--max-tokens", "256"]
    base += ["--seq-len", "64", "--batch-size", "1"]  # batches enough for standard errors
    plot = tmp_path / "gain.png"
    code, out, err = cli(*base, "--budget", "2", "--plot", str(plot), "--json", "--device", "cpu")
    result = json.loads(out)
    assert code == 0 and len(result["chosen"]) == 2 and plot.stat().st_size > 0
    assert result["chosen"] == sorted(result["scores"]["ranking"][:2])
    assert "layers by gain" in err and result["student"].startswith("seeded")
    assert "s.e." in err and len(result["scores"]["gain_errors"]) == 4
    code, _, err = cli(*base, "--budget", "9")
    assert code == 2 and "auto:K needs 1 <= K <= 4" in err
    code, _, err = cli(*base, "--budget", "0%")
    assert code == 2 and "percentage in (0, 100]" in err
    code, out, err = cli(*base, "--budget", "2", "--search", "greedy", "--json", "--device", "cpu")
    greedy = json.loads(out)
    assert code == 0 and greedy["search"] == "greedy" and len(greedy["order"]) == 2
    assert greedy["chosen"] == sorted(greedy["order"]) and "greedy picks, in order" in err
    assert greedy["order"][0] == result["scores"]["ranking"][0]
    code, _, err = cli(*base, "--search", "greedy")
    assert code == 2 and "needs --budget" in err
    code, _, err = cli(*base, "--search", "best")
    assert code == 2 and "top, greedy" in err


def test_seed_auto_scores_the_seeded_student_on_data(chat_llama, tmp_path, monkeypatch, capfd):
    import json
    import sys

    from mmdistill.cli import main

    directory, _, _ = chat_llama
    text = tmp_path / "calibration.txt"
    text.write_text("".join(f"The {i} dogs ran home before the storm.\n" for i in range(40)))
    args = ["mmdistill", "seed", "--teacher", str(directory), "-a", "auto:50%", "--json"]
    monkeypatch.setattr(sys, "argv", [*args, "--out", str(tmp_path / "s"), "--data", str(text)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    report = json.loads(capfd.readouterr().out)
    student = mmdistill.load_student(tmp_path / "s")
    assert report["attention_layers"] == student.config.layout["chosen"]
    assert len(report["attention_layers"]) == 2
    monkeypatch.setattr(sys, "argv", [*args, "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "give --data" in capfd.readouterr().err


def test_validate_checks_an_auto_budget_against_the_teacher(monkeypatch, capfd):
    import sys

    from mmdistill.cli import main

    recipe = str(ROOT / "recipes" / "tiny.yaml")
    for spec, code in [("auto:99", 2), ("auto:50%", 0)]:
        argv = ["mmdistill", "validate", recipe, f"student.attention_layers={spec}"]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exc:
            main()
        err = " ".join(capfd.readouterr().err.split())
        assert (exc.value.code or 0) == code, err
        assert ("auto:K needs 1 <= K <=" in err) == (code == 2)
