"""``mmdistill export --check``: the export, loaded by stock transformers, against the student.

Both run in float32 on the same random token ids (the student's weights rounded to the export's
dtype first, so a bf16 export is compared with what it holds): the logits must agree to
``tolerance`` relative to their largest magnitude, and stock ``generate()`` (greedy, with its
cache; without it for pure-Mamba exports, see :mod:`.hf_folder`) must give the student's tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..generation import generate
from ..model import load_student
from .hf_folder import load_export


def check_export(
    out: str,
    student_dir: str,
    tolerance: float = 1e-4,
    seq_len: int = 80,
    new_tokens: int = 8,
    seed: int = 0,
) -> dict:
    """``{"passed", "logits_max_abs_diff", "logits_scale", "relative_diff", "tolerance",
    "tokens_equal", "use_cache", "transformers"}`` for the export in ``out``."""
    import transformers

    exported = load_export(out)
    stored = json.loads((Path(out) / "config.json").read_text()).get("dtype", "float32")
    student = load_student(student_dir).to(getattr(torch, stored)).float().eval()
    vocab = student.config.vocab_size
    ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(seed))
    use_cache = bool(exported.config.use_cache)
    with torch.no_grad():
        ours = student(ids).logits
        theirs = exported(ids, use_cache=False).logits
    diff = (ours - theirs).abs().max().item()
    scale = ours.abs().max().item()
    prompt = ids[:1]
    mine = generate(student, prompt, max_new_tokens=new_tokens)  # both stop at the config's EOS
    with torch.no_grad():
        stock = exported.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )
    relative = diff / max(scale, 1e-12)
    tokens_equal = torch.equal(mine, stock)
    return {
        "passed": relative <= tolerance and tokens_equal,
        "logits_max_abs_diff": diff,
        "logits_scale": scale,
        "relative_diff": relative,
        "tolerance": tolerance,
        "tokens_equal": tokens_equal,
        "use_cache": use_cache,
        "transformers": transformers.__version__,
    }
