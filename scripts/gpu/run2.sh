#!/usr/bin/env bash
# Second H100 call (little device time left). mamba-ssm's SSD kernels carry ~200 autotune
# configs, all compiled on first use per dtype and shape: the first call's stages spent their
# limits compiling. Here the parity tests run with MAMBA_DETERMINISTIC=1 (one config per
# kernel) in 6 pytest-xdist workers, while a background process compiles and tunes the bf16
# HoVLE-shape kernels (a throwaway 2k mixer run) for the timed stages that follow, which
# re-tune on a quiet GPU from the compiled cache.
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  python3 benchmarks/mixer.py --lengths 2k --chunk-sizes 64 > /tmp/warm.log 2>&1 &
  warm=$!
  echo "== gpu tests (MAMBA_DETERMINISTIC=1, -n 6)"
  MAMBA_DETERMINISTIC=1 timeout 105 bash scripts/gpu/tests.sh -n 6
  for _ in $(seq 20); do kill -0 "$warm" 2>/dev/null || break; sleep 1; done
  kill "$warm" 2>/dev/null
  tail -3 /tmp/warm.log
  echo "== bench sweep"
  timeout 90 bash scripts/gpu/bench_hovle.sh sweep --lengths 1k,32k,103k,128k -n 16 \
    --plot "$OUT/bench_sweep.png"
  echo "== mixer"; timeout 50 bash scripts/gpu/mixer.sh 32k,128k --chunk-sizes 64
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
