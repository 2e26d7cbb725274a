#!/usr/bin/env bash
# First H100 call, stages in priority order, each with its own time limit: GPU tests, the
# HoVLE-shape batch-1 sweep (with plot), the mixer table and profile, the decode-step analysis.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  echo "== gpu tests"; timeout 150 bash scripts/gpu/tests.sh
  echo "== bench sweep"
  timeout 170 bash scripts/gpu/bench_hovle.sh sweep --lengths 1k,4k,16k,64k,103k,128k -n 32 \
    --plot "$OUT/bench_sweep.png"
  echo "== mixer"; timeout 80 bash scripts/gpu/mixer.sh 2k,8k,32k,128k
  echo "== decode"
  timeout 60 python3 benchmarks/decode.py --json "$OUT/decode.json" 2>"$OUT/decode_profile.txt"
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
