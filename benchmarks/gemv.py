"""Batch-1 matrix-vector products at the linear student's decode shapes: cuBLAS vs alternatives.

The batch-1 decode step of the HoVLE-shaped linear student is bound by reading its weights, and
cuBLAS reaches 1.9-2.6 TB/s on its 4-67 MB matrices against a 3.0 TB/s copy bandwidth
(docs/benchmarks.md). This measures, per weight shape, ``y = W x`` in bf16 with:

* ``cublas``: ``F.linear`` (what the model runs);
* ``triton``: the model's Triton GEMV (:mod:`mmdistill.kernels.triton_gemv`: rows per program,
  a loop over the input dimension, float32 accumulation) with its block shapes autotuned per
  shape;
* ``ours``: the same kernel as the model runs it (block shapes fixed by output width);
* ``inductor``: ``torch.compile`` of ``(W * x).sum(-1)`` (Inductor's reduction kernel, with
  coordinate-descent tuning).

Each variant is captured in a CUDA graph of calls cycling through enough distinct weight copies
(over 256 MB) that the 50 MB L2 cache cannot serve them, then replayed and timed with CUDA events;
results are checked against a float64 product. Prints a table (µs per call, TB/s), then the
Triton configuration the autotuner chose per shape.
Usage: ``python3 benchmarks/gemv.py``
"""

from __future__ import annotations

import argparse

import torch
import triton

from mmdistill.kernels.triton_gemv import gemv, gemv_kernel
from mmdistill.shapes import HOVLE_2_6B
from mmdistill.timing import mean_ms

_H, _M = HOVLE_2_6B.hidden_size, HOVLE_2_6B.intermediate_size
_Q = HOVLE_2_6B.num_heads * HOVLE_2_6B.head_dim
_KV = HOVLE_2_6B.num_kv_heads * HOVLE_2_6B.head_dim
SHAPES = {  # name: (out, in)
    "mlp gate or up": (_M, _H),
    "mlp gate+up packed": (2 * _M, _H),
    "mlp down": (_H, _M),
    "mixer in-proj (packed)": (_Q + 2 * _KV + _Q + HOVLE_2_6B.num_heads, _H),  # z, x, B, C, dt
    "mixer out-proj": (_H, _Q),
    "lm head": (HOVLE_2_6B.vocab_size, _H),
}


_autotuned_gemv = triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n in (4, 8, 16, 32)
        for k in (128, 256, 512)
        for w in (4, 8)
        for s in (2, 4)
    ],
    key=["N", "K"],
)(gemv_kernel)


def triton_gemv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model's GEMV kernel with its block shapes autotuned for this shape."""
    n, k = w.shape
    y = torch.empty(n, device=w.device, dtype=w.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _autotuned_gemv[grid](w, x, y, y, n, k, w.stride(0), HAS_BIAS=False)
    return y


def graph_time_us(fn, weights, x, reps: int = 5) -> float:
    """Mean µs per call of ``fn(w, x)`` cycling through ``weights``, replayed from a graph."""
    for w in weights[:2]:
        fn(w, x)  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w, x)
    graph.replay()
    return mean_ms(graph.replay, "cuda", reps) * 1e3 / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-mb", type=int, default=400, help="weight copies per shape, MB")
    args = parser.parse_args()
    torch._inductor.config.coordinate_descent_tuning = True
    inductor = torch.compile(lambda w, x: (w * x).sum(-1), dynamic=False)
    variants = {
        "cublas": lambda w, x: torch.nn.functional.linear(x[None], w)[0],
        "triton": triton_gemv,
        "ours": lambda w, x: gemv(x, w, None),
        "inductor": inductor,
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, µs per call (TB/s)")
    print("| weight | shape | MB | " + " | ".join(variants) + " |")
    print("|---|---|---:|" + "---:|" * len(variants))
    chosen = {}
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, -(-args.pool_mb * 2**20 // nbytes))
        g = torch.Generator(device="cuda").manual_seed(n + k)
        weights = [
            torch.randn(n, k, generator=g, device="cuda", dtype=torch.bfloat16)
            for _ in range(copies)
        ]
        x = torch.randn(k, generator=g, device="cuda", dtype=torch.bfloat16)
        exact = weights[0].double() @ x.double()
        cells = []
        for fn in variants.values():
            err = ((fn(weights[0], x).double() - exact).norm() / exact.norm()).item()
            if err > 1e-2:
                cells.append(f"wrong ({err:.1e})")
                continue
            us = graph_time_us(fn, weights, x)
            cells.append(f"{us:.1f} ({nbytes / us / 1e6:.2f})")
        print(f"| {name} | {n}x{k} | {nbytes / 1e6:.1f} | " + " | ".join(cells) + " |", flush=True)
        chosen[name] = str(_autotuned_gemv.best_config)
        del weights
        torch.cuda.empty_cache()
    for name, config in chosen.items():
        print(f"triton, {name}: {config}")


if __name__ == "__main__":
    main()
