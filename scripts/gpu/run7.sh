#!/usr/bin/env bash
# H100 call: the longest context of the HoVLE-2.6B-shaped teacher at batch 1 (growing and
# static KV cache, one-pass prefill, as users run it); the hybrid's 256k decode again with 16
# steps (4 steps gave an outlier); the mixer table at 128k with SSD chunks of 256.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
export TRITON_CACHE_AUTOTUNING=1
{
  cat /tmp/env.txt
  echo "== longest (teacher)"
  timeout 200 python3 -m mmdistill.cli bench --random-shape hovle-2.6b \
    --lengths 192k,256k,320k,384k -n 4 --json > "$OUT/bench_longest_teacher.json"
  echo "== hybrid 256k, 16 decode steps"
  timeout 70 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --skip-teacher \
    --seed-layout every:4 --lengths 256k -n 16 --json > "$OUT/bench_hybrid_256k.json"
  echo "== mixer, chunk 256"
  timeout 150 python3 benchmarks/mixer.py --lengths 128k --chunk-size 256 --chunk-sizes 256 \
    --json "$OUT/mixer_c256.json"
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
