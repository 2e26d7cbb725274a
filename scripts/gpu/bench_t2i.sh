#!/usr/bin/env bash
# `mmdistill bench --task t2i` at HoVLE-2.6B shapes with random weights on one GPU: images/s of
# 256-code images (a 16x16 grid from a 16384-code book: LlamaGen VQ-16's token counts; the VQ
# decoder that turns codes into pixels is not timed) after a shared context prefilled once and
# replicated over the batch, at batch 1 and at each model's best batch (searched by doubling until
# images/s stops rising by 5% or memory runs out), the split of the time and peak memory. Models:
# attention = the teacher's shape with an image vocabulary (no LoRA), linear = --seed-layout none,
# hybrid = --seed-layout every:4 (as recipes/hybrid.yaml); the students' task LoRA adapters are
# merged into their weights (--lora merged, as a server runs them) or kept (--lora adapters).
# Writes one mmdistill.bench-t2i/1 JSON document (docs/benchmarks.md) to
# $OUT/bench-t2i[-adapters]_MODELS_DEVICE_DATE.json (stamp.sh, at the end of the run), or --out.
#
# Usage: bash scripts/gpu/bench_t2i.sh [--models LIST] [--lengths L] [--lora merged|adapters]
#                                      [--out FILE] [extra `mmdistill bench` options...]
#   --models   comma list of attention, linear, hybrid (default attention,linear,hybrid)
#   --lengths  shared context lengths (k = x1024; default 1k,16k,100k)
#   --lora     merged (default) or adapters
#   --out      output file name under $OUT
#   anything else (--max-batch N, --min-gain F, --compile, ...) goes to `mmdistill bench`.
# Run from the repository root on a GPU machine with mmdistill importable (source env.sh, or
# run it through call.sh). mamba-ssm's autotuned kernel configs are cached on disk
# (TRITON_CACHE_AUTOTUNING=1), so a second bench in the same call does not tune again.
set -euo pipefail
models=attention,linear,hybrid
lengths=1k,16k,100k
lora=merged
out=""
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --models) models=$2; shift 2 ;;
    --lengths) lengths=$2; shift 2 ;;
    --lora) lora=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
args=(--task t2i --random-shape hovle-2.6b --lengths "$lengths" --lora "$lora")
attention=no
for model in ${models//,/ }; do
  case $model in
    attention) attention=yes ;;
    linear) args+=(--seed-layout none) ;;
    hybrid) args+=(--seed-layout every:4) ;;
    *) echo "bench_t2i.sh: unknown model $model (attention, linear, hybrid)" >&2; exit 2 ;;
  esac
done
[ $attention = no ] && args+=(--skip-teacher)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export TRITON_CACHE_AUTOTUNING=1
echo "bench_t2i.sh: mmdistill bench ${args[*]} ${extra[*]} --json" >&2
partial="$OUT/bench-t2i.$$.partial"
python3 -m mmdistill.cli bench "${args[@]}" "${extra[@]}" --json > "$partial"
# Stamped when the run ends, like the document's own "date".
tag=bench-t2i$([ "$lora" = merged ] || echo "-$lora")
out=${out:-${tag}_${models//,/-}_$(bash scripts/gpu/stamp.sh).json}
mv "$partial" "$OUT/$out"
echo "bench_t2i.sh: wrote $OUT/$out" >&2
