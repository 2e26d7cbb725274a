#!/usr/bin/env bash
# GPU parity tests (tests/test_kernels_gpu.py, pytest -m gpu): Triton SSD, decode, conv, norm and
# attention kernels, the decoder block's inference kernels (add + RMSNorm, SiLU·mul, batch-1
# GEMV, packed MLP) and the fused mixer against their references, cached generation against
# recomputation, static vs growing KV caches, CUDA-graph decode vs eager, CUDA-graph t2i codes vs
# generate_codes, bf16 exports under stock transformers (tests/test_export.py). Log: $OUT/gpu_tests.log.
# Usage: bash scripts/gpu/tests.sh [pytest args...]   e.g. -n 6 (pytest-xdist workers),
#        -k "cached or static or graph". Run with MAMBA_DETERMINISTIC=1 (mamba-ssm then launches one
#        configuration per kernel instead of autotuning over about 200 at first use) and without
#        TRITON_CACHE_AUTOTUNING (which would bring that autotuning back).
# The export tests need transformers >= 5.23 (the GPU machines have 5.17): carry it in .whl,
#   bash ../shared/device/prepare-wheels.sh transformers==5.24.0 huggingface-hub==2.4.0 \
#     tokenizers==0.23.3 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 h11 \
#     anyio==4.16.0 idna hf-xet
# (the versions of the CPU environment; huggingface-hub 2.4 imports httpx2, which the GPU
# machines lack); otherwise those two tests fail with the ExportError that names the fixed
# version.
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_kernels_gpu.py tests/test_export.py "$@" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -40
