#!/usr/bin/env bash
# H100 call: the 103k batch sweep (each model up to the largest batch that fits) and the longest
# context the students reach at batch 1. Autotuned mamba-ssm configs are cached on disk
# (TRITON_CACHE_AUTOTUNING=1) so the second bench does not tune again.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
export TRITON_CACHE_AUTOTUNING=1
{
  cat /tmp/env.txt
  echo "== bench batch"
  timeout 330 bash scripts/gpu/bench_hovle.sh batch --lengths 103k \
    --batch 1,2,4,8,16,32,64,256,1024,2048 --prefill-batch 1 -n 8
  echo "== longest (students)"
  timeout 230 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --skip-teacher \
    --seed-layout none --seed-layout every:4 --lengths 256k,512k,1m,2m -n 4 --json \
    > "$OUT/bench_longest_students.json"
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
