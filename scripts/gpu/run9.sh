#!/usr/bin/env bash
# H100 call after cached attention left cuDNN out (its per-shape plan build cost 35-60 ms per
# decode step): the cached-attention GPU tests, then the teacher and hybrid rows again (the
# linear student has no attention): 103k batch sweep and the batch-1 sweep.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  echo "== gpu tests (cached attention)"
  MAMBA_DETERMINISTIC=1 timeout 80 bash scripts/gpu/tests.sh -n 4 -k "cached or static or graph"
  export TRITON_CACHE_AUTOTUNING=1
  echo "== bench batch (teacher, hybrid)"
  timeout 130 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --seed-layout every:4 \
    --lengths 103k --batch 1,2,4,8,16,32 --prefill-batch 1 -n 8 --json > "$OUT/bench_batch2.json"
  echo "== bench sweep (teacher, hybrid)"
  timeout 110 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --seed-layout every:4 \
    --lengths 1k,16k,64k,103k,128k -n 16 --json > "$OUT/bench_sweep2.json"
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
