#!/usr/bin/env bash
# Convert a teacher into a Mamba-2 student in CI and decide, from exit codes and JSON reports,
# whether it ships: run (seed -> distil -> the recipe's quality gates), then export --check
# (when the run report says the student exports: stock transformers must reproduce it), then
# eval (the written student against its teacher on the pipeline's own held-out file, with
# EVAL_GATES).
#
# Usage (from the repository root):
#   examples/ci/convert.sh RECIPE OUT_DIR [key=value ...]
# Environment:
#   MMDISTILL   the command to call (default: mmdistill)
#   HELDOUT     held-out .txt/.jsonl file for the eval step (default: examples/ci/heldout.txt)
#   EVAL_GATES  gates of the eval step, separated by spaces (default: "kl<=0.05 ppl_ratio<=1.1")
# Writes OUT_DIR/run (the run: checkpoints, student/, report.json), OUT_DIR/export (when it
# exports) and OUT_DIR/reports/{run,export,eval}.json.
# Exits with the first failing step's mmdistill exit code (docs: exit codes): 0 the student
# passed every gate, 2 bad input, 3 training stopped, 4 a quality gate failed (the student is
# written, marked failing in its gates.json), 5 out of disk or memory.
set -uo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 RECIPE OUT_DIR [key=value ...]" >&2
  exit 2
fi
recipe=$1 out=$2
shift 2
read -r -a mmdistill <<< "${MMDISTILL:-mmdistill}"
heldout=${HELDOUT:-examples/ci/heldout.txt}
read -r -a eval_gates <<< "${EVAL_GATES:-kl<=0.05 ppl_ratio<=1.1}"
mkdir -p "$out/reports"

"${mmdistill[@]}" run "$recipe" "output_dir=$out/run" "$@" --json > "$out/reports/run.json"
code=$?
echo "convert: run exited $code (report: $out/reports/run.json)" >&2
if [[ $code -ne 0 ]]; then
  exit "$code"
fi

field() {  # field KEY: the run report's value (stdlib Python only)
  python3 -c 'import json, sys; print(eval("r" + sys.argv[2], {"r": json.load(open(sys.argv[1]))}))' \
    "$out/reports/run.json" "$1"
}
teacher=$(field '["teacher"]') || exit 2
if [[ $(field '["export"]["exportable"]') == True ]]; then
  "${mmdistill[@]}" export --student "$out/run/student" --out "$out/export" --force --check \
    --json > "$out/reports/export.json"
  code=$?
  echo "convert: export --check exited $code (report: $out/reports/export.json)" >&2
  if [[ $code -ne 0 ]]; then
    exit "$code"
  fi
else
  echo "convert: export skipped: $(field '"; ".join(r["export"]["reasons"])')" >&2
fi
gate_args=()
for gate in "${eval_gates[@]}"; do
  gate_args+=(--gate "$gate")
done
"${mmdistill[@]}" eval --student "$out/run/student" --teacher "$teacher" --data "$heldout" \
  "${gate_args[@]}" --json > "$out/reports/eval.json"
code=$?
echo "convert: eval exited $code (report: $out/reports/eval.json)" >&2
exit "$code"
