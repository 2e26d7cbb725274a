"""Quality gates: thresholds on a student's evaluation metrics that decide whether it ships.

A gate is written ``METRIC OP VALUE`` with OP one of ``<= >= < >``, e.g. ``kl<=0.15`` or
``answer_accuracy_ratio >= 0.9``. The metrics (:data:`METRICS`) come from an ``mmdistill eval``
report (:func:`gate_metrics`). A gate whose metric was not measured (answer accuracy without
question/answer data, a ratio over a teacher that scored 0) fails with the value ``None``: a
pipeline must not ship on a check that did not run.

Recipes list gates under ``gates.checks`` and ``run``/``eval`` take ``--gate``; a failed gate
exits with :data:`mmdistill.errors.GATES_FAILED` (the student is still written).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

METRICS = {
    "kl": "mean KL(teacher || student) per scored token (nats)",
    "top1_agreement": "share of scored tokens where both models' argmax agree",
    "student_ppl": "the student's perplexity on the data",
    "ppl_ratio": "student perplexity / teacher perplexity",
    "answer_accuracy": "the student's answer accuracy on question/answer data",
    "answer_accuracy_ratio": "student answer accuracy / teacher answer accuracy",
}
OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_PATTERN = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    """One check ``metric op threshold``."""

    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> Gate:
        """A gate from ``"kl<=0.15"``.

        Raises:
            ValueError: not ``METRIC OP NUMBER``, or an unknown metric (the message lists them).
        """
        match = _PATTERN.match(str(text))
        if match is None:
            raise ValueError(
                f"gate {text!r} is not METRIC OP NUMBER (e.g. 'kl<=0.15'; OP is <=, >=, < or >)"
            )
        metric, op, number = match.groups()
        if metric not in METRICS:
            raise ValueError(
                f"gate {text!r}: unknown metric {metric!r}; one of {', '.join(METRICS)}"
            )
        return cls(metric, op, float(number))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"

    def check(self, metrics: Mapping[str, float | None]) -> dict[str, Any]:
        """``{"gate", "metric", "op", "threshold", "value", "passed"}`` on ``metrics``."""
        value = metrics.get(self.metric)
        passed = value is not None and bool(OPERATORS[self.op](value, self.threshold))
        return {
            "gate": str(self),
            "metric": self.metric,
            "op": self.op,
            "threshold": self.threshold,
            "value": value,
            "passed": passed,
        }


def parse_gates(texts: Iterable[str]) -> list[Gate]:
    """Every gate of ``texts``, in order (raises ``ValueError`` on the first bad one)."""
    return [Gate.parse(text) for text in texts]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def gate_metrics(result: Mapping[str, Any]) -> dict[str, float | None]:
    """The gate metrics of an evaluation result (:func:`mmdistill.evaluation.evaluate`)."""
    accuracy = result.get("answer_accuracy") or {}
    return {
        "kl": result.get("kl"),
        "top1_agreement": result.get("top1_agreement"),
        "student_ppl": result.get("student_ppl"),
        "ppl_ratio": _ratio(result.get("student_ppl"), result.get("teacher_ppl")),
        "answer_accuracy": accuracy.get("student"),
        "answer_accuracy_ratio": _ratio(accuracy.get("student"), accuracy.get("teacher")),
    }


def check_gates(gates: Iterable[Gate], metrics: Mapping[str, float | None]) -> dict[str, Any]:
    """``{"passed", "checks": [Gate.check(...), ...], "metrics"}``; passed when every check is."""
    checks = [gate.check(metrics) for gate in gates]
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "metrics": dict(metrics)}


def failed_summary(report: Mapping[str, Any]) -> str:
    """The failed checks of a :func:`check_gates` report in words, e.g.
    ``"kl = 0.31 (needs <= 0.15)"``."""
    parts = []
    for check in report["checks"]:
        if not check["passed"]:
            value = "not measured" if check["value"] is None else f"{check['value']:.4g}"
            parts.append(
                f"{check['metric']} = {value} (needs {check['op']} {check['threshold']:g})"
            )
    return "; ".join(parts)
