#!/usr/bin/env bash
# GPU parity tests (tests/test_kernels_gpu.py), log to $OUT/gpu_tests.log.
python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_kernels_gpu.py "$@" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -40
