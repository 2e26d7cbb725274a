"""Which decoder layers keep attention: the ``--attention-layers`` spec.

Specs (indices count the whole flat decoder stack, e.g. HoVLE's 8 embedding-module layers then
its 24 LLM layers):

* ``none``     -- every attention layer becomes a Mamba-2 mixer (linear student; default);
* ``all``      -- nothing converted (the student equals the teacher);
* ``every:K``  -- keep layers 0, K, 2K, ... (mmMamba-hybrid is ``every:4`` over 32 layers);
* ``0,5,9``    -- an explicit comma list;
* ``auto:K`` / ``auto:P%`` -- the K layers (or P% of them, rounded, at least one) that close
  most of the gap to the teacher when restored alone (:mod:`mmdistill.layer_scores`); these
  need a measurement, so :func:`parse_attention_layers` refuses them and
  :func:`auto_budget` reads them.
"""

from __future__ import annotations


def is_auto(spec) -> bool:
    """Whether ``spec`` is an ``auto:K`` / ``auto:P%`` spec (chosen by measurement)."""
    return isinstance(spec, str) and spec.strip().lower().startswith("auto:")


def auto_budget(spec, num_layers: int) -> int | None:
    """The number of layers an ``auto:K`` / ``auto:P%`` spec keeps, or None for other specs.

    Raises:
        ValueError: K outside ``1..num_layers``, P outside ``(0, 100]``, or not a number.
    """
    if not is_auto(spec):
        return None
    value = spec.strip().lower().split(":", 1)[1].strip()
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0 < percent <= 100:
                raise ValueError
            return max(1, round(num_layers * percent / 100))
        budget = int(value)
    except ValueError:
        raise ValueError(
            f"attention layers spec {spec!r}: auto needs a layer count (auto:8) or a "
            "percentage in (0, 100] (auto:25%)"
        ) from None
    if not 1 <= budget <= num_layers:
        raise ValueError(
            f"attention layers spec {spec!r}: auto:K needs 1 <= K <= {num_layers} (the model's "
            "layers); 'none' keeps no attention, 'all' every layer"
        )
    return budget


def parse_attention_layers(spec: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """Sorted indices of the layers that keep attention.

    Raises:
        ValueError: for a malformed spec or an index outside ``[0, num_layers)``.
    """
    if isinstance(spec, (list, tuple)):
        indices = [int(i) for i in spec]
    else:
        text = str(spec).strip().lower()
        if text in ("none", ""):
            return []
        if text == "all":
            return list(range(num_layers))
        if is_auto(text):
            auto_budget(text, num_layers)  # a malformed budget says so first
            raise ValueError(
                f"attention layers spec {spec!r} picks layers by measurement: use it in a recipe "
                "(scored after the layer-wise stages) or run 'mmdistill layout' first"
            )
        if text.startswith("every:"):
            try:
                step = int(text.split(":", 1)[1])
            except ValueError:
                step = 0
            if step < 1:
                raise ValueError(f"attention layers spec {spec!r}: every:K needs a positive K")
            return list(range(0, num_layers, step))
        try:
            indices = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"attention layers spec {spec!r} is not 'none', 'all', 'every:K' or a comma list "
                "of layer indices"
            ) from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"attention layer index {bad[0]} is out of range: the model has {num_layers} layers "
            f"(0..{num_layers - 1})"
        )
    return sorted(set(indices))


def layer_types_for(spec, num_layers: int) -> list[str]:
    keep = set(parse_attention_layers(spec, num_layers))
    return ["attention" if i in keep else "mamba" for i in range(num_layers)]
