#!/usr/bin/env bash
# H100 call after run9.sh: the 103k batch sweep again with the hybrid's static-KV row, the
# hybrid's batch-1 sweep with both caches, the mixer table (its attention decode columns were
# measured on cuDNN) and the cached-attention probe.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  export TRITON_CACHE_AUTOTUNING=1
  echo "== bench batch (teacher, hybrid growing and static)"
  timeout 200 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --seed-layout every:4 \
    --lengths 103k --batch 1,2,4,8,16,32 --prefill-batch 1 -n 8 --json > "$OUT/bench_batch3.json"
  echo "== bench sweep (hybrid growing and static)"
  timeout 120 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --skip-teacher \
    --seed-layout every:4 --lengths 1k,16k,64k,103k,128k -n 16 --json > "$OUT/bench_sweep3.json"
  echo "== cached attention probe"
  timeout 60 python3 benchmarks/attn_decode.py --lengths 2k,32k,128k \
    --profile-out "$OUT/attn_decode_profile.txt"
  echo "== mixer table"
  timeout 150 bash scripts/gpu/mixer.sh 2k,8k,32k,128k --chunk-sizes 256
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
