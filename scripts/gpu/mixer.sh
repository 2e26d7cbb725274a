#!/usr/bin/env bash
# Mixer vs attention module table (benchmarks/mixer.py) with a profile at the longest length.
# Usage: scripts/gpu/mixer.sh [LENGTHS] [extra benchmarks/mixer.py args...]
lengths="${1:-2k,4k,8k,16k,32k,64k,128k}"
shift || true
python3 benchmarks/mixer.py --lengths "$lengths" --json "$OUT/mixer.json" \
  --profile 131072 --profile-out "$OUT/mixer_profile.txt" "$@"
