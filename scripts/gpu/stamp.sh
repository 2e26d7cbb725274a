#!/usr/bin/env bash
# Prints DEVICE_DATE for naming result files, e.g. `h100_2026-11-22T1753Z`: the first GPU's model
# (lower case, from nvidia-smi; `cpu` without one) and the UTC time now. No arguments.
# Used by bench.sh, probe.sh and mixer.sh; docs/results/MANIFEST.md names files this way.
name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null \
  | grep -oE '[A-Za-z]*[0-9]+' | head -1 | tr 'A-Z' 'a-z')
echo "${name:-cpu}_$(date -u +%Y-%m-%dT%H%MZ)"
