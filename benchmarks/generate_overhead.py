"""Where ``generate()``'s decode time goes beyond the captured step's (CUDA, one process).

For one student and a random prompt, times the decode phase of:

* ``<first>, the process's first request``: ``generate()`` as the first request of the process,
  greedy or sampled (``--first``), with the config's stop tokens, as ``mmdistill generate``
  runs it (the capture of the step happens before its first token and is not counted);
* ``replay``: the captured step replayed back to back (what ``mmdistill bench`` times);
* ``greedy``: ``generate()`` greedy, no stop token, ``--tokens`` new tokens;
* ``greedy, stops``: the same, with a stop token that the greedy text emits halfway (the loop
  checks for stops every ``STOP_CHECK`` steps, so it may run up to that many more);
* ``sampled``: ``generate()`` at temperature 0.8 with a seeded generator, no stop token.

Each ``generate()`` row is timed as ``mmdistill generate --json`` times it: from the first new
token (seen by a streamer) to the returned ids on the host, over the tokens after the first.
The later rows run ``--repeats`` times; the table shows the first run and the median.

After the table, the first request and a later run of the same request are traced: the host's
clock at each new token, read without waiting for the GPU. The loop waits for the GPU only
when it checks for stops (every ``STOP_CHECK`` steps), so the clock after each check shows the
GPU's progress: the trace prints ms per step for each block of ``STOP_CHECK`` steps, then the
finish (from the last token to the returned ids on the host), and the Python garbage
collections that ran during the request (generation, ms).

Usage: ``python3 benchmarks/generate_overhead.py STUDENT_DIR [--prompt 4096] [--tokens 128]
[--first greedy|sampled]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch

from mmdistill.generation import STOP_CHECK, generate, kept_graph_decoder
from mmdistill.model import load_student
from mmdistill.timing import mean_ms


@contextlib.contextmanager
def collections():
    """Yields a list that fills with ``(generation, ms)`` of each garbage collection run."""
    runs: list[tuple[int, float]] = []
    started: list[float] = []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        else:
            runs.append((info["generation"], (time.perf_counter() - started.pop()) * 1e3))

    gc.callbacks.append(note)
    try:
        yield runs
    finally:
        gc.callbacks.remove(note)


def generate_ms(
    model, ids: torch.Tensor, tokens: int, **options
) -> tuple[float, list[int], list[float]]:
    """Decode ms per token after the first, the new tokens, and the host clock (s) at each new
    token and at the end, of one ``generate()`` call."""
    seen: list[float] = []

    def streamer(token: torch.Tensor) -> None:
        if not seen:
            int(token[0])  # waits for the prefill, as the CLI's streamer does
        seen.append(time.perf_counter())

    out = generate(model, ids, max_new_tokens=tokens, streamer=streamer, **options)
    new = out[0, ids.shape[1] :].tolist()
    seen.append(time.perf_counter())
    return (seen[-1] - seen[0]) * 1e3 / max(1, len(new) - 1), new, seen


def sampling(kind: str, device: str) -> dict:
    """``generate()`` options of a greedy or seeded sampled request."""
    if kind == "greedy":
        return {}
    return {
        "do_sample": True,
        "temperature": 0.8,
        "generator": torch.Generator(device=device).manual_seed(1),
    }


def print_trace(name: str, clock: list[float], runs: list[tuple[int, float]]) -> None:
    """ms per step of each block between stop checks, then the finish (module docstring)."""
    marks = [clock[i] for i in range(1, len(clock) - 1, STOP_CHECK)]
    blocks = [(b - a) * 1e3 / STOP_CHECK for a, b in zip(marks, marks[1:], strict=False)]
    finish = (clock[-1] - clock[-2]) * 1e3
    print(f"{name}: ms/step by {STOP_CHECK}-step block, then the finish")
    print("  " + " ".join(f"{ms:.2f}" for ms in blocks) + f" | finish {finish:.1f} ms")
    print(
        "  garbage collections: " + (", ".join(f"gen {g} {ms:.1f} ms" for g, ms in runs) or "none")
    )


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--first", choices=("greedy", "sampled"), default="greedy")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the eager path")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = load_student(args.student, dtype=dtype, device=args.device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g)
    ids = ids.to(args.device)
    first = f"{args.first}, the process's first request"
    with collections() as first_gc:
        first_ms, first_new, first_clock = generate_ms(
            model, ids, args.tokens, **sampling(args.first, args.device)
        )
    with collections() as again_gc:
        _, again_new, again_clock = generate_ms(
            model, ids, args.tokens, **sampling(args.first, args.device)
        )
    _, greedy, _ = generate_ms(model, ids, args.tokens, eos_token_id=[])
    halfway = greedy[args.tokens // 2]
    decoder = kept_graph_decoder(model, 1, args.prompt + args.tokens)
    decoder.prefill(ids, chunk_size=8192)
    rows = {first: [first_ms], "replay": [mean_ms(decoder.replay, args.device, args.tokens)]}
    kept = {first: len(first_new)}
    runs = {
        "greedy": {"eos_token_id": []},
        "greedy, stops": {"eos_token_id": [halfway]},
        "sampled": {"eos_token_id": [], **sampling("sampled", args.device)},
    }
    for name, options in runs.items():
        for _ in range(args.repeats):
            if "generator" in options:
                options["generator"].manual_seed(1)
            ms, new, _ = generate_ms(model, ids, args.tokens, **options)
            rows.setdefault(name, []).append(ms)
            kept[name] = len(new)
    print_table(rows, kept, args)
    print_trace(first, first_clock, first_gc)
    print_trace(f"the same request again ({len(again_new)} tokens)", again_clock, again_gc)


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
