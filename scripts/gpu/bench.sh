#!/usr/bin/env bash
# `mmdistill bench` at HoVLE-2.6B shapes with random weights on one GPU: prefill time, decode
# latency and tokens/s, peak memory, for the teacher and students seeded from it in the same
# process (linear = --seed-layout none, hybrid = --seed-layout every:4). The teacher and the
# hybrid each get a growing-KV row, a static-KV row and a static-KV row replayed from a CUDA graph.
# Writes one mmdistill.bench/1 JSON document (docs/benchmarks.md) to
# $OUT/bench-MODE_MODELS_DEVICE_DATE.json (stamp.sh, at the end of the run), or to --out.
#
# Usage: bash scripts/gpu/bench.sh MODE [--models LIST] [--lengths L] [--batch B] [-n N]
#                                  [--out FILE] [extra `mmdistill bench` options...]
#   MODE       sweep    batch 1 over context lengths (default --lengths 1k,16k,64k,103k,128k, -n 16)
#              batch    decode throughput over batch sizes at one length: the prompt is prefilled
#                       once (--prefill-batch 1) and its cache replicated to each batch
#                       (default --lengths 103k, --batch 1,2,4,8,16,32, -n 8)
#              longest  batch 1 at long contexts, to find where each model runs out of memory
#                       (--lengths required, default -n 8)
#   --models   comma list of teacher, linear, hybrid (default teacher,linear,hybrid)
#   --lengths  context lengths (k = x1024, m = x1048576); --batch: batch sizes (batch mode)
#   -n         decode steps timed per row (--decode-tokens)
#   --out      output file name under $OUT
#   anything else (--plot FILE.png, --no-cuda-graph, --compile, ...) goes to `mmdistill bench`.
# Run from the repository root on a GPU machine with mmdistill importable (source env.sh, or
# run it through call.sh). mamba-ssm's autotuned kernel configs are cached on disk
# (TRITON_CACHE_AUTOTUNING=1), so a second bench in the same call does not tune again.
set -euo pipefail
mode=${1:?usage: bench.sh sweep|batch|longest [options]}
shift
models=teacher,linear,hybrid
lengths=""
batch=""
steps=""
out=""
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --models) models=$2; shift 2 ;;
    --lengths) lengths=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    -n|--decode-tokens) steps=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
args=(--random-shape hovle-2.6b)
case $mode in
  sweep) args+=(--lengths "${lengths:-1k,16k,64k,103k,128k}" -n "${steps:-16}") ;;
  batch) args+=(--lengths "${lengths:-103k}" --batch "${batch:-1,2,4,8,16,32}" --prefill-batch 1
                -n "${steps:-8}") ;;
  longest) args+=(--lengths "${lengths:?longest needs --lengths}" -n "${steps:-8}") ;;
  *) echo "bench.sh: unknown mode $mode (sweep, batch, longest)" >&2; exit 2 ;;
esac
teacher=no
for model in ${models//,/ }; do
  case $model in
    teacher) teacher=yes ;;
    linear) args+=(--seed-layout none) ;;
    hybrid) args+=(--seed-layout every:4) ;;
    *) echo "bench.sh: unknown model $model (teacher, linear, hybrid)" >&2; exit 2 ;;
  esac
done
[ $teacher = no ] && args+=(--skip-teacher)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export TRITON_CACHE_AUTOTUNING=1
echo "bench.sh: mmdistill bench ${args[*]} ${extra[*]} --json" >&2
partial="$OUT/bench-$mode.$$.partial"
python3 -m mmdistill.cli bench "${args[@]}" "${extra[@]}" --json > "$partial"
# Stamped when the run ends, like the document's own "date".
out=${out:-bench-${mode}_${models//,/-}_$(bash scripts/gpu/stamp.sh).json}
mv "$partial" "$OUT/$out"
echo "bench.sh: wrote $OUT/$out" >&2
