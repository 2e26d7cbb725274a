"""Which decoder layers keep attention: the ``--attention-layers`` spec.

Specs (indices count the whole flat decoder stack, e.g. HoVLE's 8 embedding-module layers then
its 24 LLM layers):

* ``none``     -- every attention layer becomes a Mamba-2 mixer (linear student; default);
* ``all``      -- nothing converted (the student equals the teacher);
* ``every:K``  -- keep layers 0, K, 2K, ... (mmMamba-hybrid is ``every:4`` over 32 layers);
* ``0,5,9``    -- an explicit comma list.
"""

from __future__ import annotations


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
