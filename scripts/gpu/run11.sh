#!/usr/bin/env bash
# H100 call after run10.sh: the whole GPU test suite (last run before the mixer's PyTorch path
# was restructured in review), and the teacher's and the hybrid's decode at their longest
# contexts (the earlier rows ran cached attention on cuDNN), the hybrid with both caches.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  echo "== gpu tests"
  MAMBA_DETERMINISTIC=1 timeout 150 bash scripts/gpu/tests.sh -n 6
  export TRITON_CACHE_AUTOTUNING=1
  echo "== longest (teacher)"
  timeout 170 python3 -m mmdistill.cli bench --random-shape hovle-2.6b \
    --lengths 320k,384k -n 8 --json > "$OUT/bench_longest_teacher2.json"
  echo "== longest (hybrid, growing and static KV)"
  timeout 150 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --skip-teacher \
    --seed-layout every:4 --lengths 512k,1m -n 8 --json > "$OUT/bench_longest_hybrid2.json"
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
