"""Where ``generate()``'s decode time goes beyond the captured step's (CUDA, one process).

For one student and a random prompt, times the decode phase of:

* ``greedy, the process's first request``: ``generate()`` greedy, no stop token, as the first
  request of the process (what ``mmdistill generate`` runs; the capture of the step happens
  before its first token and is not counted);
* ``replay``: the captured step replayed back to back (what ``mmdistill bench`` times);
* ``greedy``: ``generate()`` greedy, no stop token, ``--tokens`` new tokens;
* ``greedy, stops``: the same, with a stop token that the greedy text emits halfway (the loop
  checks for stops every ``STOP_CHECK`` steps, so it may run up to that many more);
* ``sampled``: ``generate()`` at temperature 0.8 with a seeded generator, no stop token.

Each ``generate()`` row is timed as ``mmdistill generate --json`` times it: from the first new
token (seen by a streamer) to the returned ids on the host, over the tokens after the first.
The later rows run ``--repeats`` times; the table shows the first run and the median.
Usage: ``python3 benchmarks/generate_overhead.py STUDENT_DIR [--prompt 4096] [--tokens 128]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmdistill.generation import generate, kept_graph_decoder
from mmdistill.model import load_student
from mmdistill.timing import mean_ms


def generate_ms(model, ids: torch.Tensor, tokens: int, **options) -> tuple[float, list[int]]:
    """Decode ms per token after the first, and the new tokens, of one ``generate()`` call."""
    seen: list[float] = []

    def streamer(token: torch.Tensor) -> None:
        if not seen:
            int(token[0])
            seen.append(time.perf_counter())

    out = generate(model, ids, max_new_tokens=tokens, streamer=streamer, **options)
    new = out[0, ids.shape[1] :].tolist()
    return (time.perf_counter() - seen[0]) * 1e3 / max(1, len(new) - 1), new


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the eager path")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = load_student(args.student, dtype=dtype, device=args.device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g)
    ids = ids.to(args.device)
    first_ms, greedy = generate_ms(model, ids, args.tokens, eos_token_id=[])
    halfway = greedy[args.tokens // 2]
    decoder = kept_graph_decoder(model, 1, args.prompt + args.tokens)
    decoder.prefill(ids, chunk_size=8192)
    rows = {
        "greedy, the process's first request": [first_ms],
        "replay": [mean_ms(decoder.replay, args.device, args.tokens)],
    }
    runs = {
        "greedy": {"eos_token_id": []},
        "greedy, stops": {"eos_token_id": [halfway]},
        "sampled": {"eos_token_id": [], "do_sample": True, "temperature": 0.8},
    }
    kept = {}
    for name, options in runs.items():
        for _ in range(args.repeats):
            if options.get("do_sample"):
                options["generator"] = torch.Generator(device=args.device).manual_seed(1)
            ms, new = generate_ms(model, ids, args.tokens, **options)
            rows.setdefault(name, []).append(ms)
            kept[name] = len(new)
    print_table(rows, kept, args)


def print_table(rows: dict[str, list[float]], kept: dict[str, int], args) -> None:
    """One row per decode: its first run and median ms per token, against the replays'."""
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{where}, prompt {args.prompt}, up to {args.tokens} tokens")
    print("| decode | new tokens | first run, ms | median, ms | tokens/s | / replay |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows["replay"][0]
    for name, times in rows.items():
        ms = statistics.median(times)
        new = kept.get(name, args.tokens)
        cells = f"{times[0]:.3f} | {ms:.3f} | {1e3 / ms:.1f} | {base / ms:.3f}"
        print(f"| {name} | {new} | {cells} |")


if __name__ == "__main__":
    main()
