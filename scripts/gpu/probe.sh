#!/usr/bin/env bash
# Single-component GPU probes behind docs/benchmarks.md's decode analysis (one GPU, bf16):
#   decode [ARGS]  batch-1 decode step of the random-weight HoVLE-2.6B-shaped linear student
#                  (eager, CUDA graph, torch.compile + graph) against the weight-read bound, with a
#                  profile of one eager step: benchmarks/decode.py -> $OUT/decode_DEVICE_DATE.json
#   attn [LENGTHS] [ARGS]  one cached-attention decode step per SDPA backend, growing / static /
#                  device-tracked ("tracked", the CUDA-graph path) KV cache, at each context length
#                  (default 2k,32k,128k): benchmarks/attn_decode.py -> $OUT/attn-decode_DEVICE_DATE.txt
#                  (table) and attn-decode-profile_DEVICE_DATE.txt
#   gemv [ARGS]    batch-1 GEMVs at the linear student's weight shapes, cuBLAS vs Triton vs
#                  Inductor: benchmarks/gemv.py -> $OUT/gemv_DEVICE_DATE.txt
# ARGS go to the benchmark script. DEVICE_DATE comes from stamp.sh.
# Usage: bash scripts/gpu/probe.sh decode|attn|gemv [...]
set -euo pipefail
what=${1:?usage: probe.sh decode|attn|gemv [args...]}
shift
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
stamp=$(bash scripts/gpu/stamp.sh)
export TRITON_CACHE_AUTOTUNING=1
case $what in
  decode) python3 benchmarks/decode.py --json "$OUT/decode_$stamp.json" "$@" ;;
  attn)
    lengths=2k,32k,128k
    if [ $# -gt 0 ] && [[ $1 != -* ]]; then lengths=$1; shift; fi
    python3 benchmarks/attn_decode.py --lengths "$lengths" \
      --profile-out "$OUT/attn-decode-profile_$stamp.txt" "$@" | tee "$OUT/attn-decode_$stamp.txt"
    ;;
  gemv) python3 benchmarks/gemv.py "$@" | tee "$OUT/gemv_$stamp.txt" ;;
  *) echo "probe.sh: unknown probe $what (decode, attn, gemv)" >&2; exit 2 ;;
esac
