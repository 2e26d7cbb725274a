"""Which layers should keep attention, by measurement (``--attention-layers auto:K``).

Start from a linear student (every layer Mamba-2, ideally after the layer-wise stages, which
train every mixer to imitate its attention). For each layer ``i``, restore that one layer
exactly from the teacher (its attention, norms and MLP) and measure KL(teacher || student) on
calibration tokens. A layer's **gain** is the linear student's KL minus the KL with it
restored: how much of the gap to the teacher that layer's attention closes on its own. The
``auto:K`` layout keeps the K layers of largest gain (ties: the lower index). This is the
KL-guided selection of fla-org/hybrid-distillation, applied to Mamba-2 students.

Cost: one teacher forward and ``1 + L`` student forwards per batch, but the layers before
``i`` are shared. Restoring layer ``i`` reruns only layers ``i..L-1``, from the residual stream
the linear student's forward already computed, so the restored passes cost about ``L / 2``
forwards.

A layer's gain alone ignores how layers interact: two neighbours may each close the same part
of the gap. :func:`search_layers` (``student.layout_search: greedy``) picks one layer at a time
instead, each round scoring every remaining layer with the layers already picked restored (the
same computation, from the hybrid's residual stream) and keeping the one that lowers the KL
most. It costs ``K`` scoring rounds instead of one.

Each score keeps its calibration batches' KLs too, so each gain has a standard error
(:meth:`LayerScores.gain_errors`) and the layers whose gain is clear of that noise are named
(:meth:`LayerScores.clear`): ``top`` pays where a few layers stand out, and past them orders
gains that are noise. (Keeping only the clear layers and spreading the rest of the budget
evenly was tried on SmolLM2-135M and lost to ``top``; docs/distillation.md.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from statistics import stdev

import torch

from .metrics import token_kl
from .model import DecoderLM, build_from_state_dict

Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]
"""``(input ids [b, l], pixel values or None, scored positions [b, l] bool)``."""


SEARCHES = ("top", "greedy")
"""How ``auto:K`` picks from the scores (module docstring)."""

CLEAR_ERRORS = 2.0
"""A gain is clear when it exceeds this many standard errors of the per-batch gains."""


@dataclass
class LayerScores:
    """KL per scored token of the linear student and with each layer restored; per batch too
    (``batch_tokens``, ``linear_by_batch`` and ``restored_by_batch[layer]``: KL per scored
    token of each calibration batch), which gives each gain its noise."""

    linear_kl: float
    restored_kl: list[float]
    tokens: int
    batch_tokens: list[int] = field(default_factory=list)
    linear_by_batch: list[float] = field(default_factory=list)
    restored_by_batch: list[list[float]] = field(default_factory=list)

    @property
    def gains(self) -> list[float]:
        return [self.linear_kl - kl for kl in self.restored_kl]

    def gain_errors(self) -> list[float] | None:
        """The standard error of each layer's gain over the calibration batches (the batches'
        gains are paired: the same tokens with and without the layer); ``None`` with fewer
        than two batches."""
        if len(self.batch_tokens) < 2:
            return None
        n = len(self.batch_tokens)
        return [
            stdev(lin - kl for lin, kl in zip(self.linear_by_batch, per_batch, strict=True))
            / n**0.5
            for per_batch in self.restored_by_batch
        ]

    def clear(self) -> list[int]:
        """The layers whose gain exceeds :data:`CLEAR_ERRORS` standard errors (with one batch:
        whose gain is positive), largest gain first."""
        errors = self.gain_errors() or [0.0] * len(self.gains)
        gains = self.gains
        return [i for i in self.ranking() if gains[i] > CLEAR_ERRORS * errors[i]]

    def ranking(self) -> list[int]:
        """Layers by gain, largest first (ties: lower index first)."""
        gains = self.gains
        return sorted(range(len(gains)), key=lambda i: (-gains[i], i))

    def choose(self, budget: int) -> list[int]:
        """The ``budget`` layers of largest gain, in layer order."""
        return sorted(self.ranking()[:budget])

    def to_dict(self) -> dict:
        extra = {"gain_errors": self.gain_errors(), "clear": self.clear()}
        return {**asdict(self), "gains": self.gains, "ranking": self.ranking(), **extra}

    def layout(self, spec: str, budget: int, before_stage: str | None, **extra) -> dict:
        """The record of an ``auto:K`` choice that a student's config keeps (``layout``)."""
        chosen = self.choose(budget)
        record = {"spec": spec, "budget": budget, "chosen": chosen, "before_stage": before_stage}
        return {**record, "search": "top", "scores": self.to_dict(), **extra}


@dataclass
class LayerSearch:
    """A greedy search's picks: ``order`` (first pick first) and the KL per scored token after
    each pick (``kl_after``); ``first`` is the first round, the layers scored one at a time."""

    first: LayerScores
    order: list[int]
    kl_after: list[float]

    def layout(self, spec: str, budget: int, before_stage: str | None, **extra) -> dict:
        """The record of an ``auto:K`` choice (as :meth:`LayerScores.layout`)."""
        record = {"spec": spec, "budget": budget, "chosen": sorted(self.order)}
        record |= {"before_stage": before_stage, "search": "greedy", "order": self.order}
        return {**record, "kl_after": self.kl_after, "scores": self.first.to_dict(), **extra}


@contextmanager
def restored(student: DecoderLM, teacher: DecoderLM, layer: int):
    """``student`` with layer ``layer`` replaced by the teacher's (a copy in the student's dtype
    and device when the teacher's differ), put back afterwards."""
    kept, theirs = student.layers[layer], teacher.layers[layer]
    weight, their_weight = next(kept.parameters()), next(theirs.parameters())
    if (their_weight.device, their_weight.dtype) != (weight.device, weight.dtype):
        theirs = copy.deepcopy(theirs).to(weight.device, weight.dtype)
    student.layers[layer] = theirs
    try:
        yield student
    finally:
        student.layers[layer] = kept


def _kl_sum(logits: torch.Tensor, reference: torch.Tensor, scored: torch.Tensor) -> float:
    return float(token_kl(logits[scored], reference[scored]).sum())


@torch.no_grad()
def score_layers(
    teacher: DecoderLM,
    student: DecoderLM,
    batches: Iterable[Batch],
    progress: Callable[[int], None] | None = None,
    base: Sequence[int] = (),
) -> LayerScores:
    """Score every layer of the linear ``student`` (module docstring).

    Args:
        teacher: the teacher the student was seeded from.
        student: a student whose layers are all Mamba-2.
        batches: calibration batches (:data:`Batch`); positions where ``scored`` is True are
            the positions whose next-token distributions are compared.
        progress: called with the number of batches done after each batch.
        base: layers restored from the teacher throughout: ``linear_kl`` is then the KL of
            that hybrid, and a base layer's ``restored_kl`` equals it (gain 0).
    """
    if "attention" in student.config.layer_types:
        raise ValueError("score_layers needs a linear student (attention_layers none)")
    layers = len(student.layers)
    counts: list[int] = []
    linear: list[float] = []
    restored_sums: list[list[float]] = [[] for _ in range(layers)]
    student.eval()
    with ExitStack() as stack:
        for i in base:
            stack.enter_context(restored(student, teacher, i))
        for done, (ids, pixel_values, scored) in enumerate(batches, 1):
            ids, scored = ids.to(student.device), scored.to(student.device)
            pv = pixel_values.to(student.device) if pixel_values is not None else None
            reference = teacher(ids.to(teacher.device), pixel_values=pv).logits.to(student.device)
            out = student(ids, pixel_values=pv, output_hidden_states=True)
            kl = _kl_sum(out.logits, reference, scored)
            linear.append(kl)
            for i in range(layers):
                if i in base:
                    restored_sums[i].append(kl)
                    continue
                with restored(student, teacher, i):
                    rest = student(inputs_embeds=out.hidden_states[i], layer_range=(i, layers))
                restored_sums[i].append(_kl_sum(rest.logits, reference, scored))
            counts.append(int(scored.sum()))
            if progress is not None:
                progress(done)
    return _scores(counts, linear, restored_sums)


def _scores(counts: list[int], linear: list[float], restored: list[list[float]]) -> LayerScores:
    """:class:`LayerScores` from per-batch token counts and KL sums (batches of no scored
    token count in the totals only)."""
    tokens = sum(counts)
    if tokens == 0:
        raise ValueError("no scored tokens in the calibration batches")
    kept = [b for b, n in enumerate(counts) if n]
    per_batch = [[sums[b] / counts[b] for b in kept] for sums in restored]
    return LayerScores(
        sum(linear) / tokens,
        [sum(sums) / tokens for sums in restored],
        tokens,
        [counts[b] for b in kept],
        [linear[b] / counts[b] for b in kept],
        per_batch,
    )


def search_layers(
    teacher: DecoderLM,
    student: DecoderLM,
    batches: Iterable[Batch],
    budget: int,
    progress: Callable[[int, int], None] | None = None,
) -> LayerSearch:
    """Pick ``budget`` layers greedily (module docstring): each round restores the layer that
    lowers the KL of the hybrid built so far the most (ties: the lower index).

    ``progress`` is called with (round, budget) after each round. Each round runs the teacher
    on every batch again: keeping its logits instead would hold batches x tokens x vocabulary
    floats (6.4 GB for 8 batches of 8 x 512 tokens at SmolLM2's 49,152), for a saving of about
    one forward in the ``2 + L / 2`` a round costs.
    """
    batches = list(batches)
    order: list[int] = []
    kl_after: list[float] = []
    first = None
    for round_ in range(1, budget + 1):
        scores = score_layers(teacher, student, batches, base=order)
        if first is None:
            first = scores
        best = next(i for i in scores.ranking() if i not in order)
        order.append(best)
        kl_after.append(scores.restored_kl[best])
        if progress is not None:
            progress(round_, budget)
    return LayerSearch(first, order, kl_after)


def with_attention(
    student: DecoderLM, teacher: DecoderLM, layers: list[int], layout: dict | None = None
) -> DecoderLM:
    """The linear ``student`` with ``layers`` restored exactly from the teacher (attention,
    norms and MLP): a hybrid in the student's dtype and device, ``layout`` in its config."""
    types = ["attention" if i in layers else t for i, t in enumerate(student.config.layer_types)]
    config = replace(copy.deepcopy(student.config), layer_types=types, layout=layout)
    with torch.device("meta"):
        keys = list(DecoderLM(config).state_dict())
    mine, theirs = student.state_dict(), teacher.state_dict()
    restored_prefixes = tuple(f"layers.{i}." for i in layers)
    state = {
        k: (theirs if k.startswith(restored_prefixes) else mine)[k].detach().cpu().clone()
        for k in keys
    }
    weight = next(student.parameters())
    return build_from_state_dict(config, state, weight.dtype).to(weight.device)
