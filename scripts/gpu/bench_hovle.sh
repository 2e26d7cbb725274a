#!/usr/bin/env bash
# HoVLE-2.6B-shaped random-weight bench: teacher (growing and static KV cache) vs the seeded
# linear (none) and hybrid (every:4) students. Writes $OUT/bench_NAME.json.
# Usage: scripts/gpu/bench_hovle.sh NAME [mmdistill bench args...]
name="$1"
shift
python3 -m mmdistill.cli bench --random-shape hovle-2.6b --seed-layout none \
  --seed-layout every:4 --json "$@" > "$OUT/bench_$name.json"
