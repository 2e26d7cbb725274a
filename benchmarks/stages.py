"""Throughput of the distillation stages at HoVLE-2.6B shapes (random weights) on one GPU.

Builds a random HoVLE-2.6B-shaped teacher (8 embedding-module + 24 LLM layers, width 2048,
16 heads / 8 KV heads of 128, MLP 8192, vocabulary 92553) in bfloat16, seeds a student (linear by
default), and times full optimiser steps of the trainer's own pieces
(:class:`~mmdistill.objective.TeacherForward`, :class:`~mmdistill.objective.DistillObjective`, AdamW,
float32 master weights with bf16 autocast) on text batches of ``--seq`` tokens:

* stage 1 (layer-wise MSE, trains ``ssm``) and stage 2 (layer-wise MSE, trains ``ssm, qkv``):
  one teacher forward to the last converted layer plus every mixer's forward and backward;
* stage 3 (end-to-end KL, trains ``ssm, qkv``): teacher forward with logits plus the student's
  forward and backward; model-FLOPs utilisation counts ``8 N`` FLOPs per token (teacher forward
  ``2N`` + student forward and backward ``6N``) against ``--peak`` FLOP/s (989e12: H100/H200 dense
  bf16), with ``N`` the student's parameters less the input embedding table (a lookup).

With ``--score-layers N`` (a linear student), also the cost of ``auto:K``'s measurement
(:func:`mmdistill.layer_scores.score_layers`, as a ``precision: bf16`` run calls it: bf16
autocast over the float32 student) on
N calibration batches of the same shape, and that cost in stage-3 steps.

Usage::

    python benchmarks/stages.py --out bench.json            # on a GPU
    python benchmarks/stages.py --score-layers 8 --out bench.json
    python benchmarks/stages.py --stages 3 --profile prof   # + prof-stage3.txt: kernels by time
    python benchmarks/stages.py --small --seq 64 --steps 1  # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import mmdistill
from mmdistill.model import DecoderLM
from mmdistill.objective import DistillObjective, TeacherForward
from mmdistill.recipe import LossSpec
from mmdistill.roles import set_trainable
from mmdistill.shapes import HOVLE_2_6B, ModelShape, hovle_config

SMALL = ModelShape(
    name="small",
    hidden_size=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    embedding_layers=1,
    llm_layers=2,
    vocab_size=384,
)
LLM_ROPE_SCALING = {"type": "dynamic", "factor": 2.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_stage(
    teacher: DecoderLM,
    student: DecoderLM,
    roles: list[str],
    loss: LossSpec,
    seq: int,
    batch: int,
    steps: int,
    warmup: int,
    checkpointing: bool,
    profile: str | None = None,
) -> dict:
    """Median seconds per optimiser step (one micro-batch) of a stage, and peak memory; with
    ``profile``, one more step under torch.profiler (:func:`write_profile`)."""
    device = teacher.device
    set_trainable(student, roles)
    student.train()
    student.gradient_checkpointing = checkpointing
    objective = DistillObjective(student, loss, checkpoint_mixers=checkpointing)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    runner = TeacherForward(teacher)
    layers = student.mixer_layers() if loss.mse_weight > 0 else []
    g = torch.Generator(device="cpu").manual_seed(0)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        ids = torch.randint(0, teacher.config.vocab_size - 8, (batch, seq), generator=g)
        ids = ids.to(device)
        mask = torch.ones_like(ids)
        pairs, logits = runner(ids, mask, None, layers, not loss.layerwise)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = objective(ids, mask, None, pairs, logits)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if profile:
        write_profile(step, device, profile)
    times.sort()
    optimizer.state.clear()  # AdamW's moments: the next stage's memory is its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "seconds_per_step": times[len(times) // 2],
        "tokens_per_second": batch * seq / times[len(times) // 2],
        "peak_memory_gib": peak,
        "gradient_checkpointing": checkpointing,
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
    }


def write_profile(step, device: torch.device, path: str) -> None:
    """Run ``step`` once under torch.profiler; write the operators by device time (self) and
    the share of the step each kernel family takes to ``path``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    families: dict[str, float] = {}
    for event in events:
        if device.type != "cuda":
            spent = event.self_cpu_time_total
        elif event.device_type == torch.autograd.DeviceType.CUDA:
            spent = event.self_device_time_total
        else:
            continue
        name = kernel_family(event.key)
        families[name] = families.get(name, 0.0) + spent
    total = sum(families.values()) or 1.0
    lines = [
        f"{share / total:6.1%}  {share / 1e3:9.1f} ms  {name}"
        for name, share in sorted(families.items(), key=lambda kv: -kv[1])
    ]
    with open(path, "w") as f:
        f.write("kernel families (self time; device time on a GPU)\n" + "\n".join(lines) + "\n\n")
        f.write(events.table(sort_by=sort, row_limit=60, max_name_column_width=70))
    print(f"profile written to {path}", file=sys.stderr, flush=True)


FAMILIES = (
    (
        "gemm",
        ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm"),
    ),
    ("flash attention", ("flash", "fmha", "attention")),
    (
        "mamba ssd (triton)",
        ("chunk_scan", "chunk_state", "state_passing", "bmm_chunk", "chunk_cumsum", "ssd"),
    ),
    ("conv / norm (triton)", ("conv", "rmsnorm", "layer_norm", "_layer_norm")),
    ("optimizer", ("adam", "multi_tensor")),
    ("reductions / softmax", ("reduce", "softmax", "logsumexp")),
    ("copies / casts", ("copy", "cast", "to_copy", "cat")),
    ("element-wise", ("elementwise", "vectorized", "unrolled")),
)


def kernel_family(name: str) -> str:
    """A coarse family for a kernel name (first match in :data:`FAMILIES`, else ``other``)."""
    lowered = name.lower()
    for family, needles in FAMILIES:
        if any(needle in lowered for needle in needles):
            return family
    return "other"


def time_scoring(teacher: DecoderLM, student: DecoderLM, args, stages: dict) -> dict:
    """Seconds of ``score_layers`` on ``args.score_layers`` batches, and in stage-3 steps."""
    from mmdistill.layer_scores import score_layers

    device = teacher.device
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (args.batch, args.seq)
    batches = [
        (torch.randint(0, teacher.config.vocab_size - 8, shape, generator=g), None, None)
        for _ in range(args.score_layers)
    ]
    batches = [
        (ids.to(device), None, torch.ones_like(ids, dtype=torch.bool)) for ids, _, _ in batches
    ]
    student.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        score_layers(teacher, student, batches)
    sync(device)
    seconds = time.perf_counter() - start
    step = stages["stage3"]["seconds_per_step"]
    return {
        "batches": args.score_layers,
        "seconds": seconds,
        "seconds_per_batch": seconds / args.score_layers,
        "stage3_steps_equivalent": seconds / step,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else None,
    }


def run_with_fallback(*args, profile: str | None = None) -> dict:
    """Time a stage; if it runs out of GPU memory, again with gradient checkpointing."""
    try:
        return time_stage(*args, False, profile)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return time_stage(*args, True, profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per stage")
    parser.add_argument(
        "--layout", default="none", help="student attention layers (every:4 = hybrid)"
    )
    parser.add_argument("--score-layers", type=int, default=0, help="time auto:K on N batches")
    parser.add_argument("--peak", type=float, default=989e12, help="peak bf16 FLOP/s for the MFU")
    parser.add_argument("--stages", default="1,2,3", help="which stages to time, e.g. 3")
    parser.add_argument("--profile", help="also profile one step per stage into PREFIX-stageN.txt")
    parser.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = hovle_config(SMALL if args.small else HOVLE_2_6B, LLM_ROPE_SCALING)
    with torch.device(device):
        teacher = DecoderLM(config).to(torch.bfloat16).eval()
    teacher.requires_grad_(False)
    student = mmdistill.seed(teacher, attention_layers=args.layout).float()
    n_total = sum(p.numel() for p in student.parameters())
    n_flops = n_total - student.front.llm_text_embeddings.weight.numel()
    from mmdistill.kernels import resolve_backend

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "ssd_backend": resolve_backend("auto", device),
        "seq": args.seq,
        "batch": args.batch,
        "layout": args.layout,
        "layers": config.num_layers,
        "converted_layers": len(student.mixer_layers()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": n_total,
        "mfu_parameters": n_flops,
        "stages": {},
    }
    stages = {
        "stage1": (["ssm"], LossSpec(mse_weight=1000)),
        "stage2": (["ssm", "qkv"], LossSpec(mse_weight=1000)),
        "stage3": (["ssm", "qkv"], LossSpec(kl_weight=1.0)),
    }
    chosen = {f"stage{n}" for n in args.stages.split(",")}
    for name, (roles, loss) in stages.items():
        if name not in chosen:
            continue
        profile = f"{args.profile}-{name}.txt" if args.profile else None
        stats = run_with_fallback(
            teacher,
            student,
            roles,
            loss,
            args.seq,
            args.batch,
            args.steps,
            args.warmup,
            profile=profile,
        )
        if name == "stage3":
            flops = 8 * n_flops * stats["tokens_per_second"]
            stats["model_tflops"] = flops / 1e12
            stats["mfu"] = flops / args.peak
        result["stages"][name] = stats
        print(f"{name}: {json.dumps(stats)}", file=sys.stderr, flush=True)
    if args.score_layers:
        result["layout_scoring"] = time_scoring(teacher, student, args, result["stages"])
        print(f"scoring: {json.dumps(result['layout_scoring'])}", file=sys.stderr, flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
