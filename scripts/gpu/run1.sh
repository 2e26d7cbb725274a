#!/usr/bin/env bash
# First H100 call: GPU tests, mixer table and profile, decode-step analysis, a short HoVLE-shape
# bench. Each stage has its own time limit so one stage cannot take the whole call.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  echo "== gpu tests"; timeout 170 bash scripts/gpu/tests.sh
  echo "== mixer"; timeout 130 bash scripts/gpu/mixer.sh 2k,8k,32k,128k
  echo "== decode"
  timeout 110 python3 benchmarks/decode.py --json "$OUT/decode.json" 2>"$OUT/decode_profile.txt"
  echo "== bench"
  timeout 100 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --seed-layout none \
    --seed-layout every:4 --lengths 4k,32k -n 16 --json > "$OUT/bench_quick.json"
} 2>&1 | tee "$OUT/run.log"
