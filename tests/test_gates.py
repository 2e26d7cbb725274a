"""Quality gates: parsing, verdicts, and the metrics derived from an evaluation result."""

from __future__ import annotations

import pytest

from mmdistill.gates import Gate, check_gates, failed_summary, gate_metrics


@pytest.mark.parametrize(
    ("text", "gate"),
    [
        ("kl<=0.15", Gate("kl", "<=", 0.15)),
        (" ppl_ratio <= 1.10 ", Gate("ppl_ratio", "<=", 1.1)),
        ("answer_accuracy_ratio>=0.9", Gate("answer_accuracy_ratio", ">=", 0.9)),
        ("top1_agreement>8e-1", Gate("top1_agreement", ">", 0.8)),
        ("student_ppl<20", Gate("student_ppl", "<", 20.0)),
    ],
)
def test_gates_parse(text, gate):
    assert Gate.parse(text) == gate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kl=0.1", "is not METRIC OP NUMBER"),
        ("kl<=", "is not METRIC OP NUMBER"),
        ("kl<=0.1 and", "is not METRIC OP NUMBER"),
        ("loss<=1", "unknown metric 'loss'; one of kl, "),
    ],
)
def test_bad_gates_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        Gate.parse(text)


def test_verdicts_at_the_threshold_and_for_unmeasured_metrics():
    metrics = {"kl": 0.15, "top1_agreement": 0.8, "answer_accuracy": None}
    report = check_gates(
        [Gate.parse("kl<=0.15"), Gate.parse("kl<0.15"), Gate.parse("answer_accuracy>=0")],
        metrics,
    )
    assert [c["passed"] for c in report["checks"]] == [True, False, False]
    assert report["passed"] is False and report["checks"][2]["value"] is None
    assert failed_summary(report) == (
        "kl = 0.15 (needs < 0.15); answer_accuracy = not measured (needs >= 0)"
    )
    assert check_gates([Gate.parse("kl<=0.2")], metrics)["passed"] is True


def test_metrics_of_an_evaluation_result():
    result = {
        "kl": 0.1,
        "top1_agreement": 0.9,
        "teacher_ppl": 10.0,
        "student_ppl": 11.0,
        "answer_accuracy": {"teacher": 0.8, "student": 0.6, "questions": 10},
    }
    metrics = gate_metrics(result)
    assert metrics["ppl_ratio"] == pytest.approx(1.1)
    assert metrics["answer_accuracy_ratio"] == pytest.approx(0.75)
    assert metrics["answer_accuracy"] == 0.6 and metrics["kl"] == 0.1
    zero = gate_metrics({**result, "answer_accuracy": {"teacher": 0.0, "student": 0.0}})
    assert zero["answer_accuracy_ratio"] is None  # a ratio over nothing is not measured
    assert gate_metrics({"kl": 0.1})["answer_accuracy"] is None
