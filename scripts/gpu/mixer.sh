#!/usr/bin/env bash
# Mixer vs attention module at HoVLE shapes, bf16, batch 1 (benchmarks/mixer.py): forward,
# forward+backward, peak memory, the bare SDPA and SSD kernels, the mixer's SSD step, the
# unfused mixer, and one decode step (attention with a static / growing KV cache, the mixer eager
# / CUDA graph) at each context length, with a torch.profiler table at 128k (131072 tokens).
# Writes $OUT/mixer_DEVICE_DATE.json and $OUT/mixer-profile_DEVICE_DATE.txt (stamp.sh).
# Usage: bash scripts/gpu/mixer.sh [LENGTHS] [extra benchmarks/mixer.py args...]
#   LENGTHS  comma list (default 2k,8k,32k,128k); extra args e.g. --chunk-sizes 256 (bare-kernel
#            chunks) or --chunk-size 64 (the mixer's own chunk; default: the backend's).
lengths="${1:-2k,8k,32k,128k}"
shift || true
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
stamp=$(bash scripts/gpu/stamp.sh)
export TRITON_CACHE_AUTOTUNING=1
python3 benchmarks/mixer.py --lengths "$lengths" --json "$OUT/mixer_$stamp.json" \
  --profile 131072 --profile-out "$OUT/mixer-profile_$stamp.txt" "$@"
