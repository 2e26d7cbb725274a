"""What does verifying a teacher conversion against transformers cost?

Writes a random-weight Llama checkpoint at SmolLM2-135M's shapes (30 layers, hidden 576, 9 heads,
3 KV heads, vocabulary 49,152, tied embeddings; random weights cost the same as real ones) with
transformers, then loads it with ``load_teacher`` with and without the verification, each in a
fresh process (so peak memory is that load's own), and prints a table: seconds, peak resident
memory, and the seconds the verification itself reports.
Usage: ``python benchmarks/teacher_verify.py [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

LOAD = """
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from mmdistill import load_teacher
start = time.perf_counter()
model = load_teacher(sys.argv[1], verify=sys.argv[2] == "1")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak,
                  "verified": model.config.teacher["verified"]}))
"""


def write_checkpoint(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(str(directory))


def load_once(directory: Path, verify: bool, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(directory), "1" if verify else "0", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_checkpoint(directory)
        print(f"{'load_teacher':<16}{'seconds':>10}{'peak MiB':>10}{'verify s':>10}")
        for verify in (False, True):
            for _ in range(args.repeats):
                row = load_once(directory, verify, args.threads)
                check = row["verified"].get("seconds", "-")
                name = "verify=True" if verify else "verify=False"
                print(f"{name:<16}{row['seconds']:>10.2f}{row['peak_mib']:>10.0f}{check:>10}")
        if verify:
            print(json.dumps(row["verified"]))


if __name__ == "__main__":
    main()
