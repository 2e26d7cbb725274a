#!/usr/bin/env bash
# Source from the repository root on a GPU machine: installs the carried wheels (.whl, built
# here by ../shared/device/prepare-wheels.sh) into /tmp/site and sets the environment
# (PYTHONPATH, OUT default ./gpu-out); prints the date, the GPU, torch and triton. No arguments:
#   source scripts/gpu/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1
