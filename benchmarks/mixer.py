"""Mixer vs the attention module it replaces: forward, forward+backward and decode.

On CUDA (default) at HoVLE shapes (hidden 2048, 16 heads, 8 KV heads, head_dim 128, bf16,
batch 1), for each context length:

* whole modules: :class:`~mmdistill.mixer.Mamba2Mixer` (projections, conv, SSD, gated norm,
  out_proj; fused fast path) vs :class:`~mmdistill.decoder.Attention` (q/k/v/o projections,
  RoPE, SDPA causal GQA), forward and forward+backward (input and parameter gradients);
* the bare kernels: SDPA on ready q/k/v, and mamba-ssm's ``mamba_chunk_scan_combined`` on inputs
  already in its layout; and the mixer's own SSD step (dt, A and the kernel call on the conv
  kernel's output), whose ratio to the bare kernel measures the mixer's overhead around it;
* the mixer's reference path (``use_fused_kernels = False``: eager conv, repeats, norm) for
  comparison;
* decode: one token against a context of the given length, for attention with a static
  (preallocated) and a growing KV cache, and for the mixer eagerly and replayed from a CUDA graph.

Times are medians of CUDA-event timings after warm-up. ``--device cpu`` times the chunked PyTorch
path at a tiny shape (hidden 256) with the wall clock.

Usage::

    python benchmarks/mixer.py                       # CUDA, 2k..128k
    python benchmarks/mixer.py --device cpu          # CPU, tiny shape
    python benchmarks/mixer.py --json out.json --profile 131072
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmdistill.bench import human_count, parse_counts
from mmdistill.decoder import Attention, AttnContext, KVState, Rotary, StackConfig
from mmdistill.kernels import resolve_backend
from mmdistill.mixer import CHUNK_DEFAULTS, Mamba2Mixer, MixerConfig, MixerState
from mmdistill.shapes import HOVLE_2_6B
from mmdistill.timing import median_ms

GPU_SHAPE = dict(
    hidden=HOVLE_2_6B.hidden_size,
    heads=HOVLE_2_6B.num_heads,
    kv_heads=HOVLE_2_6B.num_kv_heads,
    head_dim=HOVLE_2_6B.head_dim,
)
CPU_SHAPE = dict(hidden=256, heads=4, kv_heads=2, head_dim=64)


def build(shape: dict, device: torch.device, dtype: torch.dtype, chunk_size: int):
    """The mixer and the attention module it replaces, with random weights."""
    torch.manual_seed(0)
    cfg = MixerConfig(
        hidden_size=shape["hidden"],
        num_heads=shape["heads"],
        num_kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        chunk_size=chunk_size,
    )
    mixer = Mamba2Mixer(cfg)
    with torch.no_grad():  # a trained-looking dt range and conv instead of the seeded identity
        mixer.dt_proj.weight.normal_(0, 0.02)
        mixer.conv1d.weight.normal_(0, 0.5)
    stack = StackConfig(
        num_layers=1,
        num_heads=shape["heads"],
        num_kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        intermediate_size=4 * shape["hidden"],
        rope_theta=1e6,
    )
    attn = Attention(shape["hidden"], stack)
    rotary = Rotary(stack)
    return (
        mixer.to(device=device, dtype=dtype),
        attn.to(device=device, dtype=dtype),
        rotary.to(device),
    )


def context(rotary: Rotary, start: int, length: int, device, dtype, causal=True) -> AttnContext:
    positions = torch.arange(start, start + length, device=device)[None]
    cos, sin = rotary(positions, dtype)
    return AttnContext(cos, sin, None, causal, None)


def fwd_bwd(module_call: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, grad):
    def run():
        x = u.detach().requires_grad_(True)
        module_call(x).backward(grad)

    return run


def peak_of(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def decode_times(mixer, attn, rotary, length, device, dtype, steps: int = 20) -> dict:
    """Per-token decode against a ``length``-token context (state/KV filled by a prefill)."""
    h = mixer.config.hidden_size
    out = {}
    u = torch.randn(1, length, h, device=device, dtype=dtype)
    one = torch.randn(1, 1, h, device=device, dtype=dtype)
    with torch.no_grad():
        state = MixerState.zeros(mixer.config, 1, device, dtype)
        mixer(u, state=state)
        out["mixer_decode_ms"] = median_ms(lambda: mixer(one, state=state), device, 200)
        if device.type == "cuda":
            static = one.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    mixer(static, state=state)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                mixer(static, state=state)
            out["mixer_decode_graph_ms"] = median_ms(graph.replay, device, 200)
            del graph
        for kind in ("static", "growing"):
            capacity = length + 4 * steps + 200
            kv = (
                KVState.static(1, attn.num_kv_heads, capacity, attn.head_dim, device, dtype)
                if kind == "static"
                else KVState()
            )
            attn(u, context(rotary, 0, length, device, dtype), kv)
            ctx = context(rotary, length, 1, device, dtype, causal=False)

            def step(kv=kv, ctx=ctx):
                if kv.capacity is not None and kv.length + 1 > kv.capacity:
                    kv.length = length  # rewind: same cost per step
                attn(one, ctx, kv)

            out[f"attn_decode_{kind}_ms"] = median_ms(step, device, 200)
            del kv
    return out


def bare_sdpa(length, shape, device, dtype) -> float:
    """SDPA (causal, GQA) on ready q/k/v."""
    h, g, p = shape["heads"], shape["kv_heads"], shape["head_dim"]
    q = torch.randn(1, h, length, p, device=device, dtype=dtype)
    k = torch.randn(1, g, length, p, device=device, dtype=dtype)
    v = torch.randn(1, g, length, p, device=device, dtype=dtype)
    with torch.no_grad():
        return median_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            device,
        )


def bare_ssd(length, shape, device, dtype, chunk_sizes) -> dict:
    """mamba-ssm's SSD kernel on inputs already in its layout, for each chunk size."""
    from mmdistill.kernels import ssd_mamba_ssm as triton_backend

    h, p = shape["heads"], shape["head_dim"]
    out = {}

    chunk_scan = triton_backend._require()["fns"][0]
    x = torch.randn(1, length, h, p, device=device, dtype=dtype)
    B = torch.randn(1, length, h, p, device=device, dtype=dtype) * 0.3
    C = torch.randn(1, length, h, p, device=device, dtype=dtype) * 0.3
    dt = F.softplus(torch.randn(1, length, h, device=device) - 3)
    A = -torch.rand(h, device=device) - 0.5
    with torch.no_grad():
        for cs in chunk_sizes:
            out[f"ssd_kernel_cs{cs}_ms"] = median_ms(
                lambda cs=cs: chunk_scan(x, dt, A, B, C, cs), device
            )
    return out


def mixer_ssd_step(mixer, u) -> Callable[[], object]:
    """The mixer's SSD step on its own conv output (dt, A, kernel)."""
    c = mixer.config
    with torch.no_grad():
        zxbcdt = mixer._packed_in_proj(u)
        _, xbc, dt = zxbcdt.split([c.num_heads * c.head_dim, c.conv_dim, c.num_heads], dim=-1)
        x, B, C = mixer._conv_fused(xbc, None)

    def run():
        with torch.no_grad():
            mixer._ssd_stage(x, B, C, dt, None, None)

    return run


def profile(mixer, attn, rotary, length, device, dtype, path: str) -> None:
    """torch.profiler tables (CUDA time per kernel) of the mixer and attention at ``length``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    h = mixer.config.hidden_size
    u = torch.randn(1, length, h, device=device, dtype=dtype)
    grad = torch.randn_like(u)
    ctx = context(rotary, 0, length, device, dtype)
    lines = []
    for name, fn in (
        ("mixer forward", lambda: mixer(u)),
        ("mixer forward+backward", fwd_bwd(mixer, u, grad)),
        ("attention forward", lambda: attn(u, ctx)),
    ):
        grad_mode = torch.enable_grad() if "backward" in name else torch.no_grad()
        with grad_mode:
            fn()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        lines.append(f"== {name}, {length} tokens ==\n{table}\n")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def measure_length(mixer, attn, rotary, length, shape, device, dtype, args) -> dict:
    """Every measurement of one context length."""
    cpu = device.type == "cpu"
    u = torch.randn(1, length, shape["hidden"], device=device, dtype=dtype)
    grad = torch.randn_like(u)
    ctx = context(rotary, 0, length, device, dtype)
    row = {"length": length}
    with torch.no_grad():
        row["attn_fwd_ms"] = median_ms(lambda: attn(u, ctx), device)
        row["mixer_fwd_ms"] = median_ms(lambda: mixer(u), device)
    if not cpu:
        mixer.use_fused_kernels = False
        with torch.no_grad():
            row["mixer_unfused_fwd_ms"] = median_ms(lambda: mixer(u), device)
        mixer.use_fused_kernels = True
    attn_fb = fwd_bwd(lambda x: attn(x, ctx), u, grad)
    row["attn_fwd_bwd_ms"] = median_ms(attn_fb, device)
    row["mixer_fwd_bwd_ms"] = median_ms(fwd_bwd(mixer, u, grad), device)
    row["attn_fwd_bwd_peak_bytes"] = peak_of(attn_fb, device)
    row["mixer_fwd_bwd_peak_bytes"] = peak_of(fwd_bwd(mixer, u, grad), device)
    attn.zero_grad(set_to_none=True)
    mixer.zero_grad(set_to_none=True)
    if not cpu:
        row["sdpa_ms"] = bare_sdpa(length, shape, device, dtype)
        chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
        row.update(bare_ssd(length, shape, device, dtype, chunk_sizes))
        row["mixer_ssd_step_ms"] = median_ms(mixer_ssd_step(mixer, u), device)
        row["ssd_kernel_ms"] = row[f"ssd_kernel_cs{args.chunk_size}_ms"]
    row.update(decode_times(mixer, attn, rotary, length, device, dtype))
    return row


def run(args) -> dict:
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    shape = CPU_SHAPE if cpu else GPU_SHAPE
    dtype = torch.float32 if cpu else torch.bfloat16
    lengths = parse_counts(args.lengths or ("256,1k,4k" if cpu else "2k,4k,8k,16k,32k,64k,128k"))
    mixer, attn, rotary = build(shape, device, dtype, args.chunk_size)
    if not cpu:
        mixer.pack_projections()
    rows = []
    for length in lengths:
        print(f"length {length} ...", file=sys.stderr, flush=True)
        rows.append(measure_length(mixer, attn, rotary, length, shape, device, dtype, args))
        if not cpu:
            torch.cuda.empty_cache()
    if args.profile and not cpu:
        profile(mixer, attn, rotary, args.profile, device, dtype, args.profile_out)
    return {
        "device": torch.cuda.get_device_name(device) if not cpu else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": shape,
        "chunk_size": args.chunk_size,
        "rows": rows,
    }


def table(doc: dict) -> str:
    """Plain-text table of the rows (markdown-compatible)."""
    cpu = doc["device"] == "cpu"
    cols = [
        ("L", lambda r: human_count(r["length"])),
        ("attn fwd", lambda r: _ms(r["attn_fwd_ms"])),
        ("mixer fwd", lambda r: _ms(r["mixer_fwd_ms"])),
        ("fwd x", lambda r: f"{r['attn_fwd_ms'] / r['mixer_fwd_ms']:.1f}"),
        ("attn f+b", lambda r: _ms(r["attn_fwd_bwd_ms"])),
        ("mixer f+b", lambda r: _ms(r["mixer_fwd_bwd_ms"])),
        ("f+b x", lambda r: f"{r['attn_fwd_bwd_ms'] / r['mixer_fwd_bwd_ms']:.1f}"),
    ]
    if not cpu:
        cols += [
            ("SDPA", lambda r: _ms(r["sdpa_ms"])),
            ("SSD kernel", lambda r: _ms(r["ssd_kernel_ms"])),
            ("mixer SSD step", lambda r: _ms(r["mixer_ssd_step_ms"])),
            ("step/kernel", lambda r: f"{r['mixer_ssd_step_ms'] / r['ssd_kernel_ms']:.2f}"),
            ("unfused mixer fwd", lambda r: _ms(r["mixer_unfused_fwd_ms"])),
            ("attn f+b GiB", lambda r: f"{r['attn_fwd_bwd_peak_bytes'] / 2**30:.2f}"),
            ("mixer f+b GiB", lambda r: f"{r['mixer_fwd_bwd_peak_bytes'] / 2**30:.2f}"),
        ]
    cols += [
        ("attn decode (static KV)", lambda r: _ms(r["attn_decode_static_ms"])),
        ("attn decode (growing KV)", lambda r: _ms(r["attn_decode_growing_ms"])),
        ("mixer decode", lambda r: _ms(r["mixer_decode_ms"])),
    ]
    if not cpu:
        cols.append(("mixer decode (graph)", lambda r: _ms(r["mixer_decode_graph_ms"])))
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    rule = "|" + "|".join("---:" for _ in cols) + "|"
    body = ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in doc["rows"]]
    title = f"{doc['device']}, {doc['dtype']}, {doc['shape']}, ms (median), {doc['date']}"
    return "\n".join([title, "", head, rule, *body])


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--lengths", default=None, help="comma list, e.g. 2k,8k,32k,128k")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="the mixer's SSD chunk (default: the mixer's own for the device, CHUNK_DEFAULTS)",
    )
    parser.add_argument("--chunk-sizes", default="64,128,256", help="bare-kernel chunk sizes")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--profile", type=int, default=0, help="profile at this many tokens")
    parser.add_argument("--profile-out", default="mixer_profile.txt")
    args = parser.parse_args(argv)
    if args.chunk_size is None:
        args.chunk_size = CHUNK_DEFAULTS[resolve_backend("auto", torch.device(args.device))]
    if args.chunk_size not in [int(c) for c in args.chunk_sizes.split(",")]:
        args.chunk_sizes += f",{args.chunk_size}"
    doc = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    print(table(doc))


if __name__ == "__main__":
    main()
