#!/usr/bin/env bash
# `mmdistill generate` as users run it, against `mmdistill bench`'s decode row of the same model,
# on one GPU. A random-weight HoVLE-format teacher of HoVLE-2.6B's layer sizes (8 + 24 layers,
# width 2048, 16/8 heads, MLP 8192; its small trained tokenizer, so a smaller vocabulary than
# HoVLE's) is written with its tokenizer, a linear student seeded from it by `mmdistill seed`
# (bfloat16), then:
#   gen-4k-first.json            the 4k request below as the machine's first process (Triton
#                                compiles the kernels into its cache during its set-up)
#   gen-4k.json, gen-103k.json   greedy, 128 new tokens, the default (captured) path
#   gen-4k-cold.json             gen-4k again after emptying the page cache (where this user
#                                may: /proc/sys/vm/drop_caches), as a fresh machine's would be
#   gen-4k-eager.json            the same prompt on the eager reference path (--eager)
#   gen-4k-sample-{1,2}.json     a seeded sample (--temperature 0.8 --seed 1), twice
#   bench.json                   `mmdistill bench` of the student at 4k and 103k (64 steps)
# mamba-ssm runs with MAMBA_DETERMINISTIC=1 in every process (one launch config per kernel, no
# first-use autotuning), so generate and bench run the same kernels.
# With --setup it only writes the teacher, prompts and student (into WORKDIR) and exits.
# With --overhead, after writing the student it runs benchmarks/generate_overhead.py instead
# (the captured step's replays against generate() greedy, greedy with a stop, sampled; 4k and
# 103k prompts) into $OUT/generate-overhead.txt.
# Usage: bash scripts/gpu/generate_speed.sh [--setup|--overhead] [WORKDIR]   (writes into $OUT)
set -u
source scripts/gpu/env.sh
export MAMBA_DETERMINISTIC=1
overhead=0 setup=0
if [ "${1:-}" = --overhead ]; then overhead=1; shift; fi
if [ "${1:-}" = --setup ]; then setup=1; shift; fi
work=${1:-/tmp/generate-speed}
mkdir -p "$work"
if [ ! -f "$work/teacher/config.json" ]; then
  python3 - "$work" <<'PY'
import random, sys, time
from pathlib import Path
import torch
from mmdistill.teachers.tiny_hovle import write_tiny_hovle
from mmdistill.tokenizer import load_tokenizer

work = Path(sys.argv[1])
start = time.perf_counter()
write_tiny_hovle(work / "teacher", seed=0, dtype=torch.bfloat16, hidden_size=2048,
                 num_attention_heads=16, num_key_value_heads=8, intermediate_size=8192,
                 num_embedding_layers=8, num_llm_layers=24)
tokenizer = load_tokenizer(work / "teacher")
words = "the of and to in is was that for on with as by at from his her they it".split()
rng = random.Random(0)
for name, target in (("4k", 4096), ("103k", 105472)):
    text = " ".join(rng.choice(words) for _ in range(target))
    ids = tokenizer.encode(text, add_special_tokens=False)[: target - 1]
    (work / f"prompt-{name}.txt").write_text(tokenizer.decode(ids), encoding="utf-8")
print(f"teacher and prompts written in {time.perf_counter() - start:.0f} s", flush=True)
PY
fi
[ -f "$work/linear/config.json" ] || python3 -m mmdistill.cli seed -t "$work/teacher" -o "$work/linear" -a none \
  --dtype bfloat16 --no-verify
[ $setup = 1 ] && exit 0
if [ $overhead = 1 ]; then
  for prompt in 4096 105472; do
    python3 benchmarks/generate_overhead.py "$work/linear" --prompt $prompt --tokens 128
  done | tee "$OUT/generate-overhead.txt"
  exit 0
fi
gen() {  # NAME ARGS...
  local name=$1; shift
  python3 -m mmdistill.cli generate "$work/linear" --raw --device cuda --dtype bfloat16 --json "$@" \
    > "$OUT/$name.json" && python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[2], {k: d[k] for k in ("prompt_tokens", "new_tokens", "seconds",
      "first_token_seconds", "decode_tokens_per_s", "decode")})' "$OUT/$name.json" "$name"
}
gen gen-4k-first --prompt-file "$work/prompt-4k.txt" -n 128
gen gen-4k --prompt-file "$work/prompt-4k.txt" -n 128
if sync && echo 3 2>/dev/null > /proc/sys/vm/drop_caches; then
  gen gen-4k-cold --prompt-file "$work/prompt-4k.txt" -n 128
fi
gen gen-4k-eager --prompt-file "$work/prompt-4k.txt" -n 128 --eager
gen gen-103k --prompt-file "$work/prompt-103k.txt" -n 128
gen gen-4k-sample-1 --prompt-file "$work/prompt-4k.txt" -n 64 --temperature 0.8 --seed 1
gen gen-4k-sample-2 --prompt-file "$work/prompt-4k.txt" -n 64 --temperature 0.8 --seed 1
python3 -c 'import json, sys
t = [json.load(open(f))["text"] for f in sys.argv[1:]]
print("greedy text, captured == eager:", t[0] == t[1], "| seeded samples equal:", t[2] == t[3])' \
  "$OUT/gen-4k.json" "$OUT/gen-4k-eager.json" "$OUT/gen-4k-sample-1.json" "$OUT/gen-4k-sample-2.json"
python3 -m mmdistill.cli bench --teacher "$work/teacher" --student "$work/linear" --skip-teacher \
  --no-transformers-teacher --lengths 4k,103k -n 64 --json > "$OUT/bench.json"
python3 -c 'import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print("bench", r["model"], r["length"], r["status"], r.get("decode_tokens_per_s"),
          r.get("decode_ms_per_token"))' "$OUT/bench.json"
