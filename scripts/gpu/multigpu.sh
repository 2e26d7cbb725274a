#!/usr/bin/env bash
# Multi-GPU check of `mmdistill run` and the stage-throughput benchmark, in one go.
#
# On a machine with 2 GPUs (run from the repository root, mmdistill importable):
#   teacher   write a random HoVLE-format teacher of ~390 MB (scripts/gpu/write_random_hovle.py)
#   zero2     accelerate launch, 2 processes, DeepSpeed ZeRO-2: all three stages of recipes/tiny.yaml
#   zero3     the same with ZeRO-3
#   one       the same on 1 GPU without DeepSpeed, grad_accum 2 (same global batch and data)
#   compare   load each written student with load_student; compare first losses with the 1-GPU run
#   bench     benchmarks/stages.py at HoVLE-2.6B shapes, sequence 8192, on GPU 0
# Parts can be chosen: `bash scripts/gpu/multigpu.sh zero3 compare`. Results go to $OUT
# (default /tmp/mmdistill-gpu): summary.txt, logs.txt and one JSON per part.
set -uo pipefail
OUT=${OUT:-/tmp/mmdistill-gpu}
WORK=${WORK:-/tmp/mmdistill-work}
mkdir -p "$OUT" "$WORK"
# NVLink multicast stays off on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MMDISTILL_CACHE=$WORK/cache
PARTS=${*:-teacher zero2 zero3 one compare bench}
SUMMARY=$OUT/summary.txt
LOGS=$OUT/logs.txt

step() {  # step NAME LIMIT_SECONDS COMMAND... (stdout to $OUT/NAME.json, stderr to the log)
  local name=$1 limit=$2 start rc
  shift 2
  echo "===== $name: $*" >> "$LOGS"
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.json" 2>> "$LOGS"
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$SUMMARY"
}

want() { [[ " $PARTS " == *" $1 "* ]]; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, accelerate, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null
} >> "$SUMMARY"

TEACHER=$WORK/hovle-small
COMMON=(
  recipes/tiny.yaml "teacher=$TEACHER" precision=bf16 data.seq_len=1024
  "data.shapes={n_train: 256, n_eval: 16, text_lines: 500}" data.eval_batches=2
  stages.0.steps=6 stages.1.steps=6 stages.2.steps=6
  stages.0.batch_size=1 stages.1.batch_size=1 stages.2.batch_size=1
  stages.0.lr=1e-3 stages.1.lr=5e-4 stages.2.lr=5e-5
  checkpoint.every=3 logging.tensorboard=false logging.progress=false
)
LAUNCH=(accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
        --dynamo_backend no -m mmdistill.cli run)

want teacher && step teacher 120 python3 scripts/gpu/write_random_hovle.py "$TEACHER"
for zero in 2 3; do
  want "zero$zero" && rm -rf "$WORK/zero$zero" && step "zero$zero" 150 "${LAUNCH[@]}" \
    "${COMMON[@]}" "output_dir=$WORK/zero$zero" "distributed.deepspeed=recipes/zero$zero.json" --json
done
want one && rm -rf "$WORK/one" && CUDA_VISIBLE_DEVICES=0 step one 120 python3 -m mmdistill.cli run \
  "${COMMON[@]}" "output_dir=$WORK/one" stages.0.grad_accum=2 stages.1.grad_accum=2 \
  stages.2.grad_accum=2 --json

if want compare; then
  step compare 60 python3 - "$OUT" "$WORK" <<'EOF'
"""Load each student; compare every stage's first (and last) loss with the 1-GPU run."""
import json, sys
from pathlib import Path
import torch
import mmdistill

out, work = Path(sys.argv[1]), Path(sys.argv[2])
reports = {}
for name in ("zero2", "zero3", "one"):
    try:
        reports[name] = json.loads((out / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"{name}: no report ({exc})", file=sys.stderr)
result = {"students": {}, "first_losses": {}, "final_losses": {}, "relative_to_one": {}}
ids = torch.randint(10, 300, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
for name, report in reports.items():
    student = mmdistill.load_student(report["student_dir"], dtype="bfloat16", device="cuda")
    with torch.no_grad():
        logits = student(ids).logits.float()
    result["students"][name] = {
        "parameters": sum(p.numel() for p in student.parameters()),
        "layer_types": student.config.layer_types,
        "logits_finite": bool(torch.isfinite(logits).all()),
        "logits_mean_abs": float(logits.abs().mean()),
    }
    result["first_losses"][name] = [s["initial_loss"] for s in report["stages"]]
    result["final_losses"][name] = [s["final_loss"] for s in report["stages"]]
if "one" in reports:
    ref = result["first_losses"]["one"]
    for name in ("zero2", "zero3"):
        if name in reports:
            mine = result["first_losses"][name]
            result["relative_to_one"][name] = [abs(a - b) / abs(b) for a, b in zip(mine, ref)]
print(json.dumps(result, indent=2))
EOF
  python3 - "$OUT/compare.json" >> "$SUMMARY" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as exc:
    sys.exit(f"compare: unreadable ({exc})")
for name, losses in d["first_losses"].items():
    rel = d["relative_to_one"].get(name)
    print(f"{name}: first losses {['%.6g' % x for x in losses]}"
          + (f" relative to 1 GPU {['%.2e' % r for r in rel]}" if rel else "")
          + f"; final {['%.6g' % x for x in d['final_losses'][name]]}")
for name, s in d["students"].items():
    print(f"{name}: student {s['parameters']:,} parameters, logits finite {s['logits_finite']}")
EOF
fi

if want bench; then
  CUDA_VISIBLE_DEVICES=0 step bench 200 python3 benchmarks/stages.py --seq 8192 --steps 3 --warmup 2
  python3 - "$OUT/bench.json" >> "$SUMMARY" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as exc:
    sys.exit(f"bench: unreadable ({exc})")
print(f"bench on {d['device']} ({d['ssd_backend']} SSD), seq {d['seq']}, "
      f"N={d['mfu_parameters']:,} (student {d['student_parameters']:,})")
for name, s in d["stages"].items():
    extra = f" MFU {100 * s['mfu']:.1f}% ({s['model_tflops']:.0f} TFLOP/s)" if "mfu" in s else ""
    print(f"  {name}: {s['tokens_per_second']:,.0f} tok/s, {s['seconds_per_step']:.3f} s/step, "
          f"peak {s['peak_memory_gib']:.1f} GiB, checkpointing {s['gradient_checkpointing']}{extra}")
EOF
fi
cat "$SUMMARY"
