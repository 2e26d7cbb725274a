"""Which SDPA backend should attention use when it reads a KV cache?

Times ``decoder.Attention`` decoding one token (batch 1, HoVLE shape: hidden 2048, 16 heads, 8
KV heads of 128, bf16) against a context of each length, with a growing and a static KV cache
(and a static one whose fill level lives on the device: "tracked", the CUDA-graph decode path,
which runs ``mmdistill.kernels.triton_attention`` instead of SDPA), with the backends
``decoder.Attention`` allows when it reads a cache (``decoder.CACHED_SDPA_BACKENDS``: every
backend but cuDNN), with every backend allowed (PyTorch's default choice), and with each backend
forced alone; then profiles one step as shipped (kernels and CPU ops by time). Prints a table;
``--profile-out`` gets the profile.
Usage: ``python3 benchmarks/attn_decode.py --lengths 2k,32k,128k``
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).parent))
from mixer import GPU_SHAPE, build, context, timed  # noqa: E402

from mmdistill import decoder  # noqa: E402
from mmdistill.bench import parse_counts  # noqa: E402
from mmdistill.decoder import KVState  # noqa: E402

ALL = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]
BACKENDS = {
    "mmdistill": None,
    "pytorch default": ALL,
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}


@contextlib.contextmanager
def cached_backends(backends):
    """Let ``decoder.Attention`` use these backends when it reads a cache (``None``: as
    shipped). It wraps its SDPA call in its own ``sdpa_kernel``, so an outer one would not
    reach it."""
    shipped = decoder.CACHED_SDPA_BACKENDS
    if backends is not None:
        decoder.CACHED_SDPA_BACKENDS = backends
    try:
        yield
    finally:
        decoder.CACHED_SDPA_BACKENDS = shipped


def step_fn(attn, rotary, length, kind, device, dtype):
    one = torch.randn(1, 1, GPU_SHAPE["hidden"], device=device, dtype=dtype)
    u = torch.randn(1, length, GPU_SHAPE["hidden"], device=device, dtype=dtype)
    kv = (
        KVState()
        if kind == "growing"
        else KVState.static(1, attn.num_kv_heads, length + 600, attn.head_dim, device, dtype)
    )
    if kind == "tracked":
        kv.track_on_device()
    with torch.no_grad():
        attn(u, context(rotary, 0, length, device, dtype), kv)
    ctx = context(rotary, length, 1, device, dtype, causal=False)

    def step():
        if kv.capacity is not None and kv.length + 1 > kv.capacity:
            kv.length = 0
            kv.advance(length)
            if kv.slot is not None:
                kv.slot.fill_(length)
        with torch.no_grad():
            attn(one, ctx, kv)
        if kv.slot is not None:
            kv.advance()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2k,32k,128k")
    parser.add_argument("--profile-out", default="attn_decode_profile.txt")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    _, attn, rotary = build(GPU_SHAPE, device, dtype, 256)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, ms per step (median)")
    print("| L | KV | " + " | ".join(BACKENDS) + " |")
    print("|---:|---|" + "---:|" * len(BACKENDS))
    for length in parse_counts(args.lengths):
        for kind in ("growing", "static", "tracked"):
            cells = []
            for backend in BACKENDS.values() if kind != "tracked" else [None]:
                try:
                    step = step_fn(attn, rotary, length, kind, device, dtype)
                    with cached_backends(backend):
                        cells.append(f"{timed(step, device, 300):.3f}")
                except RuntimeError as exc:
                    cells.append("n/a" if "No available kernel" in str(exc) else "error")
                torch.cuda.empty_cache()
            cells += [""] * (len(BACKENDS) - len(cells))
            print(f"| {length} | {kind} | " + " | ".join(cells) + " |", flush=True)
    step = step_fn(attn, rotary, parse_counts(args.lengths)[0], "static", device, dtype)
    for _ in range(3):
        step()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    text += "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    Path(args.profile_out).write_text(text)
    print(text[:6000])


if __name__ == "__main__":
    main()
