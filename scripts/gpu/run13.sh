#!/usr/bin/env bash
# H100 call: teacher and hybrid, each with a growing KV cache (eager), a static one (eager) and a
# static one replayed from a CUDA graph: the 103k batch sweep and the batch-1 sweep.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  export TRITON_CACHE_AUTOTUNING=1
  echo "== bench batch (teacher, hybrid)"
  timeout 240 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --seed-layout every:4 \
    --lengths 103k --batch 1,2,4,8,16,32 --prefill-batch 1 -n 8 --json > "$OUT/bench_batch.json"
  echo "== bench sweep (teacher, hybrid)"
  timeout 200 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --seed-layout every:4 \
    --lengths 1k,16k,64k,103k,128k -n 16 --json > "$OUT/bench_sweep.json"
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
