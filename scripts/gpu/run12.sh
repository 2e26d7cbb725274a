#!/usr/bin/env bash
# H100 call for CUDA-graph decode of hybrids (static KV cache with its fill level on the
# device, split-KV Triton attention): the new and the decode-path GPU tests, the cached-attention
# probe with the new kernel, the hybrid's 103k batch sweep and batch-1 sweep.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  echo "== gpu tests (decode paths)"
  MAMBA_DETERMINISTIC=1 timeout 150 bash scripts/gpu/tests.sh -n 6 \
    -k "decode_attention or graph or cached or static"
  export TRITON_CACHE_AUTOTUNING=1
  echo "== cached attention probe"
  timeout 60 python3 benchmarks/attn_decode.py --lengths 2k,32k,128k \
    --profile-out "$OUT/attn_decode_profile.txt" > "$OUT/attn_decode.txt"; head -14 "$OUT/attn_decode.txt"
  echo "== bench batch (hybrid)"
  timeout 150 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --skip-teacher \
    --seed-layout every:4 --lengths 103k --batch 1,2,4,8,16,32 --prefill-batch 1 -n 8 --json \
    > "$OUT/bench_batch_hybrid.json"
  echo "== bench sweep (hybrid)"
  timeout 120 python3 -m mmdistill.cli bench --random-shape hovle-2.6b --skip-teacher \
    --seed-layout every:4 --lengths 1k,16k,64k,103k,128k -n 16 --json \
    > "$OUT/bench_sweep_hybrid.json"
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
