#!/usr/bin/env bash
# H100 call after the mixer's SSD chunk default became per backend (256 on mamba-ssm's
# kernels): GPU parity tests, the mixer table and the batch-1 bench sweep at the new default.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  echo "== gpu tests (MAMBA_DETERMINISTIC=1, -n 6)"
  MAMBA_DETERMINISTIC=1 timeout 130 bash scripts/gpu/tests.sh -n 6
  export TRITON_CACHE_AUTOTUNING=1
  echo "== mixer (default chunk)"; timeout 150 bash scripts/gpu/mixer.sh 2k,8k,32k,128k --chunk-sizes 64,256
  echo "== bench sweep"
  timeout 170 bash scripts/gpu/bench_hovle.sh sweep --lengths 1k,4k,16k,64k,103k,128k -n 16 \
    --plot "$OUT/bench_sweep.png"
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
