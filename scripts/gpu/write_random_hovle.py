"""Write a random-weight HoVLE-format teacher for multi-GPU checks (a few hundred MB).

The checkpoint has HoVLE's layout and tokenizer conventions (see
:func:`mmdistill.teachers.tiny_hovle.write_tiny_hovle`) at a size between the tiny fixture
and HoVLE-2.6B: width 1024, 8 heads / 4 KV heads of 128, MLP 4096, 4 embedding-module layers and
8 LLM layers, 448-pixel tiles of 256 image tokens; about 190M parameters, stored in bfloat16.

Usage::

    python scripts/gpu/write_random_hovle.py /tmp/hovle-small
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mmdistill.teachers.tiny_hovle import write_tiny_hovle

SMALL = dict(
    hidden_size=1024,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=4096,
    num_embedding_layers=4,
    num_llm_layers=8,
    image_size=448,
    patch_size=14,
    downsample_ratio=0.5,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (created or overwritten)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    facts = write_tiny_hovle(args.out, seed=args.seed, dtype=torch.bfloat16, **SMALL)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    facts["bytes"] = size
    facts["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(facts, default=str))


if __name__ == "__main__":
    main()
