#!/usr/bin/env bash
# One GPU machine call: installs the carried wheels and prints the device (env.sh), then runs each
# STEP in order under its own time limit, logging everything to $OUT/run.log (default
# ./gpu-out). A step that fails or times out does not stop the next one.
# Usage: bash scripts/gpu/call.sh 'SECONDS COMMAND' ['SECONDS COMMAND' ...]
#   COMMAND is one shell command line (it may start with VAR=value), run from the repository root.
# e.g.   bash scripts/gpu/call.sh '150 MAMBA_DETERMINISTIC=1 bash scripts/gpu/tests.sh -n 6' \
#          '240 bash scripts/gpu/bench.sh batch --models teacher,hybrid' \
#          '200 bash scripts/gpu/bench.sh sweep --models teacher,hybrid'
set -u
source scripts/gpu/env.sh > /tmp/env.txt 2>&1
{
  cat /tmp/env.txt
  for step in "$@"; do
    echo "== $step"
    if [[ ! $step =~ ^[[:space:]]*([0-9]+)[[:space:]]+(.+)$ ]]; then
      echo "call.sh: a step is 'SECONDS COMMAND'; got: $step"
      continue
    fi
    timeout "${BASH_REMATCH[1]}" bash -c "${BASH_REMATCH[2]}"
    echo "== rc=$?"
  done
  echo "== done"
} 2>&1 | tee "$OUT/run.log"
