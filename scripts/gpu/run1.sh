#!/usr/bin/env bash
# One H100 call, stages in priority order, each with its own time limit: GPU tests, the
# HoVLE-shape batch-1 sweep (with plot), the 103k batch sweep, the mixer table and profile, the
# decode-step analysis. At most 8 files come back from $OUT.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  echo "== gpu tests"; timeout 130 bash scripts/gpu/tests.sh
  echo "== bench sweep"
  timeout 130 bash scripts/gpu/bench_hovle.sh sweep --lengths 1k,4k,16k,64k,103k,128k -n 32 \
    --plot "$OUT/bench_sweep.png"
  echo "== bench batch"
  timeout 110 bash scripts/gpu/bench_hovle.sh batch --lengths 103k \
    --batch 1,2,4,8,16,64,256,1024,2048 --prefill-batch 1 -n 8
  echo "== mixer"; timeout 75 bash scripts/gpu/mixer.sh 2k,8k,32k,128k
  echo "== decode"; timeout 55 python3 benchmarks/decode.py --json "$OUT/decode.json"
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
