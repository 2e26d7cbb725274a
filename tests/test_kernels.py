"""SSD kernels: the chunked PyTorch path against the naive recurrence, outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from mmdistill.kernels import check_backend, resolve_backend, ssd, ssd_step
from mmdistill.kernels.chunked import ssd_chunked
from mmdistill.kernels.naive import ssd_naive


def make_inputs(
    length,
    heads=6,
    groups_b=2,
    groups_c=6,
    p=4,
    n=5,
    batch=2,
    dtype=torch.float64,
    initial=True,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return dict(
        x=r(batch, length, heads, p),
        dt=r(batch, length, heads),
        A=-torch.rand(heads, generator=g, dtype=torch.float64).to(dtype) - 0.1,
        B=r(batch, length, groups_b, n, scale=0.5),
        C=r(batch, length, groups_c, n, scale=0.5),
        D=r(heads),
        dt_bias=r(heads),
        initial_state=r(batch, heads, p, n) if initial else None,
    )


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("length", [1, 63, 129, 1000])
@pytest.mark.parametrize("ratio", [1, 2, 3])
@pytest.mark.parametrize("initial", [False, True])
def test_chunked_matches_naive_float64(length, ratio, initial):
    inputs = make_inputs(length, heads=6, groups_b=6 // ratio, groups_c=6, initial=initial)
    y_ref, s_ref = ssd_naive(**inputs, return_final_state=True)
    y, s = ssd_chunked(**inputs, return_final_state=True, chunk_size=32)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(s, s_ref) < 1e-10


@pytest.mark.parametrize("length", [1, 63, 129])
@pytest.mark.parametrize("ratio", [1, 3])
def test_chunked_matches_naive_float32(length, ratio):
    inputs = make_inputs(length, heads=6, groups_b=6 // ratio, groups_c=2, dtype=torch.float32)
    y_ref = ssd_naive(**{k: v.double() if v is not None else None for k, v in inputs.items()})
    y = ssd_chunked(**inputs, chunk_size=64)
    assert y.dtype == torch.float32
    assert rel_err(y.double(), y_ref) < 1e-5


@pytest.mark.parametrize(
    "length,ratio,initial", [(1, 1, True), (63, 2, False), (129, 3, True), (1000, 2, True)]
)
def test_chunked_gradients_match_naive(length, ratio, initial):
    inputs = make_inputs(length, heads=6, groups_b=6 // ratio, groups_c=6, initial=initial, seed=1)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    grads = []
    for fn in (ssd_naive, lambda **kw: ssd_chunked(**kw, chunk_size=32)):
        for v in leaves.values():
            v.grad = None
        y, s = fn(**{**inputs, **leaves}, return_final_state=True)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        ((y * w).sum() + (s * 0.3).sum()).backward()
        grads.append({k: v.grad.clone() for k, v in leaves.items()})
    for key in leaves:
        assert rel_err(grads[1][key], grads[0][key]) < 1e-9, key


def test_step_matches_sequence():
    inputs = make_inputs(7, heads=6, groups_b=2, groups_c=3)
    y_ref, s_ref = ssd_naive(**inputs, return_final_state=True)
    state = inputs["initial_state"].clone()
    ys = []
    for t in range(7):
        ys.append(
            ssd_step(
                state,
                inputs["x"][:, t],
                inputs["dt"][:, t],
                inputs["A"],
                inputs["B"][:, t],
                inputs["C"][:, t],
                D=inputs["D"],
                dt_bias=inputs["dt_bias"],
                backend="torch",
            )
        )
    assert rel_err(torch.stack(ys, 1), y_ref) < 1e-12
    assert rel_err(state, s_ref) < 1e-12


def test_dispatch_and_validation():
    inputs = make_inputs(40)
    assert torch.allclose(ssd(**inputs, backend="auto"), ssd_naive(**inputs), atol=1e-10)
    assert torch.allclose(ssd(**inputs, backend="naive"), ssd_naive(**inputs))
    with pytest.raises(ValueError, match="backend"):
        check_backend("cuda-magic")
    with pytest.raises(ValueError, match="backend"):
        ssd(**inputs, backend="cuda-magic")
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match="groups"):
        ssd_naive(**make_inputs(5, heads=6, groups_b=4))


@pytest.mark.parametrize("return_final", [False, True])
@pytest.mark.parametrize("initial", [False, True])
def test_triton_wrapper_segments_long_sequences(monkeypatch, initial, return_final):
    """Past CUDA's grid limit ``ssd_triton`` runs segments of whole chunks with the state carried
    over. The kernel is stood in for by the chunked PyTorch SSD behind mamba-ssm's signature (it
    records each call's length); the result must equal one float64 recurrence over the whole
    sequence, gradients included. The wrapper casts the per-head parameters and the state to
    float32 as mamba-ssm wants, so they are drawn float32-exact and the state compared at float32
    precision."""
    from mmdistill.kernels import ssd_mamba_ssm as triton_backend

    calls = []

    def chunk_scan(x, dt, A, B, C, chunk_size, *, initial_states, return_final_states, **kw):
        calls.append((x.shape[1], B.shape[2], initial_states is not None))
        return ssd_chunked(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=chunk_size,
            initial_state=initial_states,
            return_final_state=return_final_states,
            **kw,
        )

    monkeypatch.setattr(triton_backend, "_require", lambda: {"fns": (chunk_scan, None)})
    monkeypatch.setattr(triton_backend, "GRID_LIMIT", 13)  # 13 // 6 groups: 2 chunks per call
    inputs = make_inputs(150, heads=6, groups_b=2, groups_c=6, initial=initial)
    leaves = {
        k: (v.float().double() if k in ("A", "D", "dt_bias", "initial_state") else v)
        .clone()
        .requires_grad_(True)
        for k, v in inputs.items()
        if v is not None
    }
    out = triton_backend.ssd_triton(**leaves, chunk_size=16, return_final_state=return_final)
    reference = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    y_ref, s_ref = ssd_naive(**reference, return_final_state=True)

    assert [c[0] for c in calls] == [32, 32, 32, 32, 22]
    assert all(c[1] == 6 for c in calls)  # B expanded to one group per head
    assert [c[2] for c in calls] == [initial, True, True, True, True]
    y, s = out if return_final else (out, None)
    assert rel_err(y, y_ref) < 1e-10
    w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
    loss, loss_ref = (y * w).sum(), (y_ref * w).sum()
    if return_final:
        assert s.dtype == torch.float32 and rel_err(s, s_ref) < 1e-7
        loss, loss_ref = loss + (s * 0.3).sum(), loss_ref + (s_ref * 0.3).sum()
    loss.backward()
    loss_ref.backward()
    for key in leaves:
        assert rel_err(leaves[key].grad, reference[key].grad) < 1e-7, key
