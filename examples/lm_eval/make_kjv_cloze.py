"""Build the ``kjv_cloze`` lm-evaluation-harness task: the last word of held-out KJV verses.

Each item is a verse of the held-out books (Ruth, Job, Hosea, Zechariah, Galatians, Hebrews:
never in the SmolLM2 example's distillation text) with its last word removed, and four
choices: that word and the last words of three other held-out verses. Accuracy is the share of
items where the model gives the true word the highest log-likelihood (chance: 0.25).

    python examples/lm_eval/make_kjv_cloze.py      # needs the `bible` program (bible-kjv)

writes ``examples/lm_eval/kjv_cloze.jsonl`` (shipped; the same every time).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from mmdistill.data.kjv import read_verses, split_verses

ITEMS = 200
HERE = Path(__file__).resolve().parent


def _last_word(text: str) -> tuple[str, str] | None:
    """``(context, " word")`` of a verse ending in a plain word (then punctuation), else None."""
    match = re.fullmatch(r"(.{24,}?) ([A-Za-z]{3,})([.,;:?!]*)", text.strip())
    return None if match is None else (match.group(1), " " + match.group(2))


def main() -> None:
    verses = split_verses(read_verses())["heldout"]
    pairs = [p for p in (_last_word(v.text) for v in verses) if p is not None]
    rng = random.Random(0)
    chosen = rng.sample(pairs, ITEMS)
    words = sorted({word for _, word in pairs})
    lines = []
    for context, word in chosen:
        choices = [word, *rng.sample([w for w in words if w != word], 3)]
        rng.shuffle(choices)
        item = {"context": context, "choices": choices, "answer": choices.index(word)}
        lines.append(json.dumps(item))
    (HERE / "kjv_cloze.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {ITEMS} items from {len(pairs)} held-out verses to {HERE / 'kjv_cloze.jsonl'}")


if __name__ == "__main__":
    main()
