"""lm-evaluation-harness tasks on any :class:`~mmdistill.model.DecoderLM` (optional: needs
``lm-eval``, imported only when a task runs; task data must be local)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..generation import generate
from ..metrics import token_nll
from ..model import DecoderLM
from ..tokenizer import Tokenizer
from .documents import special_affixes, windows


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


@torch.no_grad()
def _log_likelihood(model: DecoderLM, ids: list[int], n: int) -> tuple[float, bool]:
    """Summed log-probability of the last ``n`` tokens of ``ids`` and whether each is the argmax."""
    x = torch.tensor([ids], device=model.device)
    logits = model(x).logits[0, -n - 1 : -1]
    target = x[0, -n:]
    total = -float(token_nll(logits, target).sum())
    return total, bool((logits.float().argmax(-1) == target).all())


class _Requests:
    """What the harness asks of a model, over token ids (wrapped as an ``LM`` by
    :func:`_harness_model`)."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer, max_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix = special_affixes(tokenizer)[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        cont = self.encode(continuation)
        ids = (self.prefix + self.encode(context) + cont)[-self.max_length :]
        return _log_likelihood(self.model, ids, min(len(cont), len(ids) - 1))

    def rolling(self, text: str) -> float:
        ids = self.prefix + self.encode(text)
        spans = windows(ids, self.max_length, None)
        return sum(_log_likelihood(self.model, w.ids, len(w.ids) - 1)[0] for w in spans)

    def generate_until(self, context: str, options: dict) -> str:
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        ids = (self.prefix + self.encode(context))[-self.max_length :]
        x = torch.tensor([ids], device=self.model.device)
        new = generate(self.model, x, max_new_tokens=int(options.get("max_gen_toks", 256)))
        text = self.tokenizer.decode(new[0, len(ids) :].tolist())
        for stop in until:
            text = text.split(stop)[0]
        return text


def _harness_model(model: DecoderLM, tokenizer: Tokenizer, max_length: int):
    """``model`` wrapped as an ``lm_eval.api.model.LM`` (log-likelihoods and greedy generation)."""
    from lm_eval.api.model import LM

    requests = _Requests(model, tokenizer, max_length)

    class HarnessLM(LM):
        def loglikelihood(self, batch):
            return [requests.loglikelihood(*r.args[:2]) for r in batch]

        def loglikelihood_rolling(self, batch):
            return [requests.rolling(r.args[0]) for r in batch]

        def generate_until(self, batch):
            return [requests.generate_until(r.args[0], dict(r.args[1] or {})) for r in batch]

    return HarnessLM()


def run_lm_eval(
    model: DecoderLM,
    tokenizer: Tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    max_length: int = 2048,
    include_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on ``model`` (offline: task data must be local).

    Args:
        model: any :class:`DecoderLM`.
        tokenizer: its tokenizer.
        tasks: harness task names.
        limit: examples per task.
        max_length: longest context fed to the model (left-truncated).
        include_path: a directory of extra task YAML files (e.g. tasks over local JSON data).

    Returns:
        The harness's per-task ``results`` dict.

    Raises:
        DataError: lm-eval is not installed, or a task or its data cannot be loaded.
    """
    if not lm_eval_available():
        raise DataError(
            "--tasks needs lm-evaluation-harness: pip install lm-eval (task data must then be "
            "local: in the Hugging Face datasets cache, or tasks of your own via --include-path)"
        )
    from lm_eval.evaluator import evaluate as harness_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    try:
        manager = TaskManager(include_path=str(include_path) if include_path else None)
        task_dict = get_task_dict(list(tasks), manager)
    except Exception as exc:  # the harness raises many types for unknown tasks and missing data
        raise DataError(
            f"lm-eval could not load task(s) {', '.join(tasks)}: {type(exc).__name__}: {exc}. "
            "Check the task names and that their data is available offline."
        ) from exc
    results = harness_evaluate(
        lm=_harness_model(model, tokenizer, max_length),
        task_dict=task_dict,
        limit=limit,
        bootstrap_iters=0,
        log_samples=False,
        verbosity="WARNING",
    )
    return results.get("results", {}) if results else {}
