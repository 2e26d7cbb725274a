"""GPU parity tests (marked ``gpu``; skipped without CUDA, or without mamba-ssm's kernels).

Triton paths against the PyTorch ones: the SSD kernels (forward and backward, bf16 and fp32,
GQA-grouped B, per-head C, initial state), the decode step, the fused conv and decode kernels,
whole mixers, cached generation against recomputation, the static KV cache against the growing
one, CUDA-graph decode against eager decode, and the CUDA-graph t2i step against
``generate_codes``.
"""

from __future__ import annotations

import pytest
import torch

from mmdistill.kernels import ssd, ssd_step
from mmdistill.kernels import ssd_mamba_ssm as triton_backend
from mmdistill.kernels.chunked import ssd_chunked
from mmdistill.kernels.fused_reference import conv_silu_expand_ref, mixer_decode_step_ref
from mmdistill.kernels.naive import ssd_step_naive

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not triton_backend.available(),
        reason="needs CUDA and mamba-ssm's Triton kernels",
    ),
]

CUDA = torch.device("cuda")
# ‖a − b‖ / ‖b‖ bounds: fp32 runs tf32 dot products inside the Triton kernels.
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _exact_torch_fp32():
    """Keep the PyTorch references in true fp32 (no tf32 in cuBLAS/cuDNN)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def ssd_inputs(length, dtype, heads=4, groups_b=2, p=32, n=32, batch=2, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=CUDA) * scale).to(dtype)

    return dict(
        x=r(batch, length, heads, p),
        dt=r(batch, length, heads) - 2.0,
        A=-torch.rand(heads, generator=g, device=CUDA) - 0.2,
        B=r(batch, length, groups_b, n, scale=0.5),
        C=r(batch, length, heads, n, scale=0.5),
        D=r(heads),
        dt_bias=torch.randn(heads, generator=g, device=CUDA) * 0.5,
        initial_state=torch.randn(batch, heads, p, n, generator=g, device=CUDA),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 63, 129, 1000])
def test_ssd_triton_matches_chunked_forward_and_backward(dtype, length):
    inputs = ssd_inputs(length, dtype)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    results = []
    for backend in ("triton", "reference"):
        for v in leaves.values():
            v.grad = None
        if backend == "triton":
            y, s = ssd(**leaves, return_final_state=True, chunk_size=64, backend="triton")
        else:  # float64 chunked reference on the same (rounded) values
            ref = {k: v.double() for k, v in leaves.items()}
            y, s = ssd_chunked(**ref, return_final_state=True, chunk_size=64)
        w = torch.linspace(-1, 1, y.numel(), device=CUDA).view_as(y)
        ((y.double() * w).sum() + (s.double() * 0.3).sum()).backward()
        results.append((y.detach(), s.detach(), {k: v.grad.clone() for k, v in leaves.items()}))
    (y_t, s_t, g_t), (y_r, s_r, g_r) = results
    assert y_t.dtype == dtype
    assert rel(y_t, y_r) < TOL[dtype] and rel(s_t, s_r) < TOL[dtype]
    for key in g_r:
        assert rel(g_t[key], g_r[key]) < 2 * TOL[dtype], key


def test_ssd_triton_segments_match_one_call(monkeypatch):
    """The real kernel run in segments of 3 chunks (a lowered grid limit) equals one call, and
    both equal the float64 reference, gradients included."""
    inputs = ssd_inputs(1000, torch.float32)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    outputs = []
    for limit in (triton_backend.GRID_LIMIT, 12):  # 12 // 4 heads: 3 chunks of 64 per call
        monkeypatch.setattr(triton_backend, "GRID_LIMIT", limit)
        for v in leaves.values():
            v.grad = None
        y, s = ssd(**leaves, return_final_state=True, chunk_size=64, backend="triton")
        ((y.double() * 0.01).sum() + (s.double() * 0.3).sum()).backward()
        outputs.append((y.detach(), s.detach(), {k: v.grad.clone() for k, v in leaves.items()}))
    ref = {k: v.detach().double() for k, v in inputs.items()}
    y_r, s_r = ssd_chunked(**ref, return_final_state=True, chunk_size=64)
    (y_1, s_1, g_1), (y_n, s_n, g_n) = outputs
    assert rel(y_n, y_r) < TOL[torch.float32] and rel(s_n, s_r) < TOL[torch.float32]
    assert rel(y_n, y_1) < 1e-3 and rel(s_n, s_1) < 1e-3
    for key in g_1:
        assert rel(g_n[key], g_1[key]) < 1e-3, key


def test_ssd_triton_past_the_grid_limit():
    """300,000 tokens with 16 heads is past one launch's 65,535 grid rows (262,080 tokens):
    the segmented call runs and matches the chunked PyTorch SSD."""
    inputs = ssd_inputs(300_000, torch.bfloat16, heads=16, groups_b=8, p=32, n=32, batch=1)
    assert inputs["x"].shape[1] > triton_backend.segment_length(1, 16, 64)
    y, s = ssd(**inputs, return_final_state=True, chunk_size=64, backend="triton")
    ref = {k: v.float() for k, v in inputs.items()}
    y_r, s_r = ssd_chunked(**ref, return_final_state=True, chunk_size=256)
    assert rel(y, y_r) < TOL[torch.bfloat16] and rel(s, s_r) < TOL[torch.bfloat16]


@pytest.mark.parametrize("gate_before", [False, True])
def test_gated_norm_row_blocks_match_one_call(monkeypatch, gate_before):
    """Past 2**31 elements the gated norm runs in blocks of rows (here 7 rows, a lowered limit):
    outputs and gradients equal one call's. The gate is a view with a wider row stride, as in
    the mixer, where it is a slice of the packed in-projection."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    packed = torch.randn(2, 50, 512, generator=g, device=CUDA)
    y0 = torch.randn(2, 50, 256, generator=g, device=CUDA)
    w0 = torch.rand(256, generator=g, device=CUDA) + 0.5
    results = []
    for limit in (triton_backend.INT32_MAX, 8 * 512):
        monkeypatch.setattr(triton_backend, "INT32_MAX", limit)
        leaves = [t.clone().requires_grad_(True) for t in (packed, y0, w0)]
        z = leaves[0][..., 128:384]
        out = triton_backend.gated_rmsnorm_triton(leaves[1], z, leaves[2], 1e-5, 64, gate_before)
        (out * torch.linspace(-1, 1, out.numel(), device=CUDA).view_as(out)).sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for one, blocks in zip(*results, strict=True):
        assert rel(blocks, one) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_ssd_step_triton_matches_reference(dtype, with_bias):
    inputs = ssd_inputs(5, dtype)
    state_t = inputs["initial_state"].clone()
    state_r = inputs["initial_state"].clone().double()
    bias = inputs["dt_bias"] if with_bias else None
    for t in range(5):
        step = {k: inputs[k][:, t] for k in ("x", "dt", "B", "C")}
        y_t = ssd_step(
            state_t, **step, A=inputs["A"], D=inputs["D"], dt_bias=bias, backend="triton"
        )
        y_r = ssd_step_naive(
            state_r,
            **{k: v.double() for k, v in step.items()},
            A=inputs["A"].double(),
            D=inputs["D"].double(),
            dt_bias=None if bias is None else bias.double(),
        )
        assert rel(y_t, y_r) < TOL[dtype]
    assert rel(state_t, state_r) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,with_state", [(2, False), (2, True), (4, True), (1, False)])
def test_conv_kernel_matches_reference(dtype, k, with_state):
    from mmdistill.kernels.triton_fused import conv_silu_expand

    h, g, p, n, b, l = 6, 2, 32, 16, 2, 300
    channels = g * (p + n) + h * n
    gen = torch.Generator(device=CUDA).manual_seed(1)
    packed = torch.randn(b, l, channels + 40, generator=gen, device=CUDA).to(dtype)
    weight = torch.randn(channels, 1, k, generator=gen, device=CUDA).to(dtype)
    bias = torch.randn(channels, generator=gen, device=CUDA).to(dtype)
    state = torch.randn(b, channels, k - 1, generator=gen, device=CUDA).to(dtype)
    state = state if with_state else None
    grads = [torch.randn(b, l, h, w, generator=gen, device=CUDA).to(dtype) for w in (p, n, n)]
    outs = []
    for fn in (conv_silu_expand, conv_silu_expand_ref):
        leaves = [t.clone().requires_grad_(True) for t in (packed, weight, bias)]
        xbc = leaves[0][..., 20 : 20 + channels]  # a strided view, as in the mixer
        ys = fn(xbc, leaves[1], leaves[2], state, h, g, p, n)
        sum((y.float() * gr.float()).sum() for y, gr in zip(ys, grads, strict=True)).backward()
        outs.append(([y.detach() for y in ys], [t.grad for t in leaves]))
    for a, b_ in zip(outs[0][0] + outs[0][1], outs[1][0] + outs[1][1], strict=True):
        assert rel(a, b_) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "gate_before,use_d,k", [(True, False, 2), (False, True, 4), (True, True, 1)]
)
def test_decode_kernel_matches_reference(dtype, gate_before, use_d, k):
    from mmdistill.kernels.triton_fused import mixer_decode_step

    h, g, p, n, b = 6, 3, 64, 32, 3
    channels = g * (p + n) + h * n
    gen = torch.Generator(device=CUDA).manual_seed(2)

    def r(*shape):
        return torch.randn(*shape, generator=gen, device=CUDA)

    args = dict(
        conv_weight=r(channels, 1, k).to(dtype),
        conv_bias=r(channels).to(dtype),
        dt_bias=r(h).to(dtype),
        A_log=(r(h) * 0.3).to(dtype),
        D=r(h).to(dtype) if use_d else None,
        norm_weight=r(h * p).to(dtype),
        heads=h,
        groups=g,
        head_dim=p,
        d_state=n,
        eps=1e-5,
        gate_before=gate_before,
    )
    conv_t, ssm_t = r(b, channels, k - 1).to(dtype), r(b, h, p, n)
    conv_r, ssm_r = conv_t.clone(), ssm_t.clone()
    for _ in range(4):
        z = r(b, h * p + channels + h).to(dtype)
        y_t = mixer_decode_step(z, conv_t, ssm_t, **args)
        y_r = mixer_decode_step_ref(z, conv_r, ssm_r, **args)
        assert rel(y_t, y_r) < TOL[dtype]
    assert rel(ssm_t, ssm_r) < TOL[dtype]
    assert torch.equal(conv_t, conv_r)


def make_mixer(
    dtype, conv_kernel=2, gate_order="before_norm", use_D=False, bias=False, kv=2, bc_norm=False
):
    from mmdistill.mixer import Mamba2Mixer, MixerConfig

    torch.manual_seed(0)
    cfg = MixerConfig(
        hidden_size=64,
        num_heads=4,
        num_kv_heads=kv,
        head_dim=32,
        conv_kernel=conv_kernel,
        gate_order=gate_order,
        use_D=use_D,
        qkv_bias=bias,
        bc_norm=bc_norm,
        chunk_size=64,
    )
    m = Mamba2Mixer(cfg)
    with torch.no_grad():
        for param in m.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return m.to(device=CUDA, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "conv_kernel,gate_order,use_D,bias,kv,bc_norm",
    [
        (2, "before_norm", False, False, 2, False),
        (4, "after_norm", True, True, 1, False),
        (3, "before_norm", True, False, 4, False),
        (2, "before_norm", False, True, 2, True),
    ],
)
def test_mixer_fused_matches_torch_backend(
    dtype, conv_kernel, gate_order, use_D, bias, kv, bc_norm
):
    m = make_mixer(dtype, conv_kernel, gate_order, use_D, bias, kv, bc_norm)
    u = torch.randn(2, 77, 64, device=CUDA).to(dtype)
    results = []
    for backend in ("triton", "torch"):
        m.zero_grad(set_to_none=True)
        x = u.clone().requires_grad_(True)
        out = m(x, backend=backend)
        (
            out.float() * torch.linspace(-1, 1, out.numel(), device=CUDA).view_as(out)
        ).sum().backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters()}
        results.append((out.detach(), x.grad.clone(), grads))
    (o_t, dx_t, g_t), (o_r, dx_r, g_r) = results
    assert rel(o_t, o_r) < TOL[dtype]
    assert rel(dx_t, dx_r) < 2 * TOL[dtype]
    for key in g_r:
        # With B/C norms every gradient passes the norms' backward (through B and C, which
        # feed all of the SSD), whose cancellations amplify the kernels' bfloat16 rounding
        # differences (measured 0.09-0.11 for b_proj, b_norm_weight and conv1d); float32 stays
        # within the common bound for every parameter.
        factor = 5 if bc_norm else 3
        assert rel(g_t[key], g_r[key]) < factor * TOL[dtype], (key, rel(g_t[key], g_r[key]))


@pytest.mark.parametrize("bc_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixer_fused_prefill_decode_and_mask(dtype, bc_norm):
    from mmdistill.mixer import MixerState

    m = make_mixer(dtype, conv_kernel=4, use_D=True, bc_norm=bc_norm)
    u = torch.randn(3, 40, 64, device=CUDA).to(dtype)
    mask = torch.ones(3, 40, dtype=torch.long, device=CUDA)
    mask[1, :9] = 0
    with torch.no_grad():
        full = m(u, backend="torch")
        state = MixerState.zeros(m.config, 3, CUDA, dtype)
        ptrs = state.conv.data_ptr(), state.ssm.data_ptr()
        parts = [m(u[:, :20], state=state), m(u[:, 20:23], state=state)]
        parts += [m(u[:, t : t + 1], state=state) for t in range(23, 40)]
        assert (state.conv.data_ptr(), state.ssm.data_ptr()) == ptrs  # updated in place
        assert rel(torch.cat(parts, 1), full) < TOL[dtype]
        masked = m(u, mask=mask)
        ref = m(u, mask=mask, backend="torch")
        assert rel(masked[1, 9:], ref[1, 9:]) < TOL[dtype]


def tiny_models(dtype):
    from mmdistill.bench import random_model
    from mmdistill.seeding import seed

    teacher = random_model("tiny", CUDA, dtype, seed=0)
    return teacher, seed(teacher, "none"), seed(teacher, "every:2")


@pytest.mark.parametrize("decode", ["auto", "eager"])  # auto: the captured step on CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_generation_matches_recompute(dtype, decode):
    from mmdistill.generation import generate

    for model in tiny_models(dtype):
        prompt = torch.randint(0, 256, (2, 33), device=CUDA)
        with torch.no_grad():
            out = generate(model, prompt, max_new_tokens=8, prefill_chunk_size=16, decode=decode)
            for t in range(prompt.shape[1], out.shape[1]):
                logits = model(out[:, :t]).logits[:, -1].float()
                top2 = logits.topk(2).values
                clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * top2.abs().max()
                agree = logits.argmax(-1) == out[:, t]
                assert bool((agree | ~clear).all()), t


def test_captured_generation_samples_with_a_seed_and_decodes_padded_batches():
    """The default path on CUDA: a seeded sample is reproducible and streams what it returns;
    a left-padded batch of a linear student gives the eager path's tokens (greedy, fp32)."""
    from mmdistill.generation import generate, resolve_path

    _, linear, hybrid = tiny_models(torch.float32)
    prompt = torch.randint(0, 256, (3, 21), device=CUDA)
    for model in (linear, hybrid):
        assert resolve_path(model, "auto") == "graph"
        streamed = []
        kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=40, eos_token_id=[])
        one = generate(
            model,
            prompt,
            generator=torch.Generator(CUDA).manual_seed(3),
            streamer=streamed.append,
            **kw,
        )
        kept = dict(model.__dict__["_graph_decoders"])
        two = generate(model, prompt, generator=torch.Generator(CUDA).manual_seed(3), **kw)
        assert torch.equal(one, two)
        assert dict(model.__dict__["_graph_decoders"]) == kept  # reused, not captured again
        assert torch.equal(torch.stack(streamed, 1), one[:, prompt.shape[1] :])
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    mask[2, :11] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(
        generate(linear, prompt, **kw), generate(linear, prompt, decode="eager", **kw)
    )


def test_captured_generation_of_a_hovle_student_equals_eager(tmp_path):
    """A HoVLE-format front-end inside the captured step (its id range check reads the host,
    which capture forbids): the default path's greedy tokens are the eager path's."""
    import mmdistill
    from mmdistill.generation import generate
    from mmdistill.teachers.tiny_hovle import write_tiny_hovle

    write_tiny_hovle(tmp_path / "teacher", seed=0)
    student = mmdistill.seed(mmdistill.load_teacher(str(tmp_path / "teacher")), "none").to(CUDA)
    prompt = torch.randint(0, 200, (2, 17), device=CUDA)
    kw = dict(max_new_tokens=10, eos_token_id=[])
    assert torch.equal(
        generate(student, prompt, **kw), generate(student, prompt, decode="eager", **kw)
    )


def test_static_kv_cache_matches_growing():
    from mmdistill.cached_forward import prefill
    from mmdistill.model import LMCache

    teacher, _, hybrid = tiny_models(torch.float32)
    for model in (teacher, hybrid):
        ids = torch.randint(0, 256, (2, 50), device=CUDA)
        logits = []
        for max_length in (None, 64):
            cache = LMCache(model, 2, CUDA, model.dtype, max_length=max_length)
            with torch.no_grad():
                steps = [prefill(model, cache, ids[:, :40], chunk_size=16)]
                for t in range(40, 50):
                    steps.append(model(ids[:, t : t + 1], cache=cache).logits[:, -1])
            logits.append(torch.stack(steps))
        assert rel(logits[1], logits[0]) < 1e-5


@pytest.mark.parametrize("dtype,compile_step", [(torch.float32, False), (torch.bfloat16, True)])
def test_graph_decode_matches_eager(dtype, compile_step):
    from mmdistill.cached_forward import prefill
    from mmdistill.graph_decode import GraphDecoder
    from mmdistill.model import LMCache

    _, linear, hybrid = tiny_models(dtype)
    with pytest.raises(ValueError, match="attention: give max_length"):
        GraphDecoder(hybrid, 2)
    ids = torch.randint(0, 256, (2, 37), device=CUDA)
    decoder = GraphDecoder(linear, 2, compile=compile_step)
    with torch.no_grad():
        cache = LMCache(linear, 2, CUDA, dtype)
        logits = prefill(linear, cache, ids, chunk_size=16)
        inputs, eager = [logits.argmax(-1)], []
        for _ in range(6):
            logits = linear(inputs[-1][:, None], cache=cache).logits[:, -1]
            eager.append(logits.float())
            inputs.append(logits.argmax(-1))
        decoder.prefill(ids, chunk_size=16)
        graph = []
        for step in range(6):
            decoder.tokens.copy_(inputs[step])  # same inputs: no divergence on near-ties
            graph.append(decoder.replay().float().clone())
            assert torch.equal(decoder.tokens, decoder.logits.argmax(-1))  # feeds itself
    assert decoder.cache.seen == 37 + 6
    assert rel(torch.stack(graph), torch.stack(eager)) < TOL[dtype]
    if not compile_step:  # the same kernels replayed: identical
        assert torch.equal(torch.stack(graph), torch.stack(eager))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 8, 128), (8, 8, 64), (32, 4, 80)])
def test_decode_attention_kernel_matches_reference(dtype, heads, kv_heads, head_dim):
    """The split-KV Triton kernel against the PyTorch reference at fill levels inside the first
    split, across splits and at the full capacity, with garbage past the fill level; then
    captured once in a CUDA graph and replayed as the fill level grows."""
    from mmdistill.kernels.attention import decode_attention_ref
    from mmdistill.kernels.triton_attention import decode_attention

    g = torch.Generator(device=CUDA).manual_seed(heads + head_dim)
    capacity = 3001
    q = torch.randn(2, heads, head_dim, generator=g, device=CUDA).to(dtype)
    k = torch.randn(2, kv_heads, capacity, head_dim, generator=g, device=CUDA).to(dtype)
    v = torch.randn(2, kv_heads, capacity, head_dim, generator=g, device=CUDA).to(dtype)
    for length in (1, 45, 1000, 2999, capacity):
        fill = torch.tensor([length], device=CUDA)
        garbage = k.clone()
        garbage[:, :, length:] = 30.0
        ref = decode_attention_ref(q, garbage, v, fill)
        assert rel(decode_attention(q, garbage, v, fill), ref) < TOL[dtype] / 3

    fill = torch.tensor([1], device=CUDA)
    decode_attention(q, k, v, fill)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, fill)
    for length in (7, 600, 3000):
        fill.fill_(length)
        graph.replay()
        assert rel(out, decode_attention_ref(q, k, v, fill)) < TOL[dtype] / 3


@pytest.mark.parametrize("dtype,compile_step", [(torch.float32, False), (torch.bfloat16, True)])
def test_hybrid_graph_decode_matches_eager(dtype, compile_step):
    """A hybrid replayed from a CUDA graph over a device-tracked static KV cache against its
    eager decode with a growing cache: the same logits within tolerance, the Python lengths
    kept, a replicated batch-1 prefill, and a clear error before the cache overflows."""
    from mmdistill.cached_forward import prefill
    from mmdistill.graph_decode import GraphDecoder
    from mmdistill.model import LMCache

    _, _, hybrid = tiny_models(dtype)
    ids = torch.randint(0, 256, (2, 37), device=CUDA)
    with torch.no_grad():
        cache = LMCache(hybrid, 2, CUDA, dtype)
        logits = prefill(hybrid, cache, ids, chunk_size=12)  # chunks 12, 12, 12, 1
        inputs, eager = [logits.argmax(-1)], []
        for _ in range(6):
            logits = hybrid(inputs[-1][:, None], cache=cache).logits[:, -1]
            eager.append(logits.float())
            inputs.append(logits.argmax(-1))
        decoder = GraphDecoder(hybrid, 2, compile=compile_step, max_length=37 + 6)
        decoder.prefill(ids, chunk_size=12)
        graph = []
        for step in range(6):
            decoder.tokens.copy_(inputs[step])
            graph.append(decoder.replay().float().clone())
        with pytest.raises(ValueError, match="full"):
            decoder.replay()
        states = [s for s in decoder.cache.layers if hasattr(s, "k_buffer")]
        assert all(s.length == 43 and int(s.slot) == 43 for s in states)
        assert rel(torch.stack(graph), torch.stack(eager)) < TOL[dtype]

        one = LMCache(hybrid, 1, CUDA, dtype)
        prefill(hybrid, one, ids[:1], chunk_size=12)
        decoder.load_cache(one)
        decoder.tokens.copy_(inputs[0][:1].expand(2))
        replicated = decoder.replay().float()
        assert rel(replicated[1], replicated[0]) < 1e-6
        assert rel(replicated[0], eager[0][0]) < TOL[dtype]


@pytest.mark.parametrize("layout", ["none", "every:2"])
def test_t2i_graph_decode_gives_the_codes_of_generate_codes(layout):
    """Images decoded from the CUDA-graph t2i step (unmerged random LoRA, code and position
    embeddings, image head) against ``generate_codes``' eager loop: identical codes, for a
    linear and a hybrid student, from a batched prompt and from one prompt replicated."""
    from mmdistill.cached_forward import prefill
    from mmdistill.data.t2i import t2i_prompt
    from mmdistill.image_vocab import ImageVocabSpec
    from mmdistill.model import LMCache
    from mmdistill.omni_student import add_image_vocabulary
    from mmdistill.seeding import seed
    from mmdistill.t2i_generation import generate_codes
    from mmdistill.t2i_graph import ImageGraphDecoder
    from mmdistill.task_lora import LoraSpec

    teacher, _, _ = tiny_models(torch.float32)
    spec = ImageVocabSpec(teacher.config.vocab_size, 64, 4, embed_dim=16)
    model = add_image_vocabulary(seed(teacher, layout), spec, LoraSpec(dropout=0.0), seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name.startswith("image_vocab.position"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.eval()
    captions = [[5, 17, 33, 9], [41, 2, 8, 100]]
    ids = torch.tensor([t2i_prompt(spec, c) for c in captions], device=CUDA)
    want = generate_codes(model, captions).codes
    decoder = ImageGraphDecoder(model, 2, max_length=ids.shape[1] + 16)
    with torch.no_grad():
        got = decoder.generate(decoder.prefill(ids)).codes
        one = LMCache(model, 1, CUDA, model.dtype)
        logits = prefill(model, one, ids[1:], head="image")
        decoder.load_cache(one)
        replicated = decoder.generate(logits).codes
    assert decoder.graph is not None and want.unique().numel() > 2
    assert torch.equal(got, want)
    assert torch.equal(replicated, want[1:].expand_as(replicated))


@pytest.mark.parametrize("layout", ["none", "every:2"])
def test_default_t2i_decoding_on_cuda_is_captured_and_equals_the_reference(layout):
    """``image_codes`` with default sampling replays the captured step on CUDA (greedy, no
    guidance) and gives the reference loop's codes; padded captions through attention use the
    reference loop."""
    from mmdistill.t2i_evaluation import image_codes, image_decode_path
    from mmdistill.t2i_generation import Sampling

    model = _random_lora_t2i_student(layout)
    for captions in ([[5, 17, 33, 9], [41, 2, 8, 100]], [[5, 17, 33, 9], [41, 2]]):
        path = image_decode_path(model, captions, Sampling())
        padded = len({len(c) for c in captions}) > 1
        assert path == ("eager" if padded and layout != "none" else "graph")
        got = image_codes(model, captions).codes
        assert torch.equal(got, image_codes(model, captions, Sampling(decode="eager")).codes)


def _random_lora_t2i_student(layout):
    """A tiny seeded student with an image vocabulary and random (non-zero) t2i adapters."""
    from mmdistill.image_vocab import ImageVocabSpec
    from mmdistill.omni_student import add_image_vocabulary
    from mmdistill.seeding import seed
    from mmdistill.task_lora import LoraSpec

    teacher, _, _ = tiny_models(torch.float32)
    spec = ImageVocabSpec(teacher.config.vocab_size, 64, 4, embed_dim=16)
    model = add_image_vocabulary(seed(teacher, layout), spec, LoraSpec(dropout=0.0), seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.5)
    return model.eval()


@pytest.mark.parametrize("layout", ["none", "every:2"])
def test_cached_t2i_generation_equals_recomputation_on_cuda(layout):
    """Greedy t2i codes with the recurrent cache (fused kernels) = a full forward per code."""
    from test_t2i_generation import _recomputed

    from mmdistill.t2i_generation import generate_codes

    model = _random_lora_t2i_student(layout)
    captions = [[5, 17, 33, 9], [41, 2, 8]]
    got = generate_codes(model, captions).codes
    with torch.no_grad():
        assert got.is_cuda and torch.equal(got.cpu(), _recomputed(model, captions).cpu())


_GUIDED_DRIFT = pytest.mark.xfail(
    strict=True,
    reason="known defect: on CUDA the cached logits of the unconditional (empty-caption, "
    "4 padded tokens) rows drift from a full recomputation by up to 0.27 (linear; 0.04 in the "
    "hybrid, where no code flips), while a full CUDA forward is within 0.003 of float64 on "
    "the CPU; conditional rows and the CPU path agree",
)


@pytest.mark.parametrize("layout", [pytest.param("none", marks=_GUIDED_DRIFT), "every:2"])
def test_cached_guided_t2i_codes_are_the_recomputed_argmax_on_cuda(layout):
    """Teacher-forced: every guided code (``uncond + 3 (cond - uncond)``) of the cached path is
    the argmax of a full forward over the prompt and those codes, unless the recomputed top
    two are within 1e-3 (a tie either path may break)."""
    from mmdistill.data.t2i import t2i_prompt
    from mmdistill.t2i_generation import Sampling, generate_codes

    model = _random_lora_t2i_student(layout)
    spec = model.image_vocab.spec
    captions = [[5, 17, 33, 9], [41, 2, 8]]
    guided = generate_codes(model, captions, Sampling(cfg_scale=3.0)).codes.flatten(1)
    rows = [t2i_prompt(spec, c) for c in captions] + [t2i_prompt(spec, [])] * 2
    codes = (guided + spec.code_offset).tolist()
    full = [r + codes[i % 2] for i, r in enumerate(rows)]
    width = max(len(r) for r in full)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in full], device=CUDA)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in full], device=CUDA)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, head="image").logits.float()
    steps = logits[:, -spec.codes_per_image - 1 : -1]
    mixed = steps[2:] + 3.0 * (steps[:2] - steps[2:])
    top2 = mixed.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    wrong = (mixed.argmax(-1) != guided) & (margin >= 1e-3)
    assert not wrong.any(), (
        f"{int(wrong.sum())} of {wrong.numel()} guided codes differ; recomputed margins there: "
        f"{margin[wrong].tolist()[:8]}"
    )


def test_chunked_hybrid_prefill_keeps_the_flash_kernel_and_equals_one_pass():
    """A prefill chunk after the first attends to the cache through SDPA's lower-right causal
    bias: bf16 with grouped-query heads runs the flash kernel (no math fallback, no dense mask)
    and gives the one-pass prefill's logits."""
    from mmdistill.bench import random_model
    from mmdistill.cached_forward import prefill
    from mmdistill.model import LMCache
    from mmdistill.seeding import seed

    hybrid = seed(random_model("tiny", CUDA, torch.bfloat16, seed=0), "every:2")
    ids = torch.randint(0, 256, (1, 200), device=CUDA)
    with torch.no_grad():
        one_pass = prefill(hybrid, LMCache(hybrid, 1, CUDA, hybrid.dtype), ids)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            chunked = prefill(hybrid, LMCache(hybrid, 1, CUDA, hybrid.dtype), ids, chunk_size=64)
    names = [e.key.lower() for e in prof.key_averages()]
    assert any("flash" in n for n in names), names
    assert not any("softmax" in n for n in names), names  # the math path's own softmax
    assert rel(chunked.float(), one_pass.float()) < TOL[torch.bfloat16]


def test_lm_head_pads_an_odd_vocabulary_and_equals_the_plain_gemm():
    """On CUDA the LM head pads an odd vocabulary to an aligned width inside the GEMM (a view of
    the padded output comes back); outputs and gradients equal ``F.linear``'s."""
    from mmdistill.decoder import VocabLinear

    torch.manual_seed(0)
    head = VocabLinear(256, 1001, bias=False).to(CUDA, torch.bfloat16)
    x = torch.randn(2, 128, 256, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    out = head(x)
    assert out.shape == (2, 128, 1001) and not out.is_contiguous()  # the padded path ran
    plain = torch.nn.functional.linear(x, head.weight)
    assert rel(out.float(), plain.float()) < 1e-2
    upstream = torch.randn_like(plain)
    grads = [torch.autograd.grad((o * upstream).sum(), (x, head.weight)) for o in (out, plain)]
    for padded, reference in zip(grads[0], grads[1], strict=True):
        assert rel(padded.float(), reference.float()) < 1e-2
    assert head(x[:, :1]).is_contiguous()  # decode-sized inputs: the plain GEMV


def test_fused_rms_norm_of_a_training_student_equals_the_pytorch_one():
    """float32 with autograd on CUDA runs mamba-ssm's fused kernel: outputs and the input and
    weight gradients equal the PyTorch path's (run here with grad off, then differentiated by
    hand through the same formula)."""
    from mmdistill.decoder import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(256, 1e-6).to(CUDA)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 70, 256, device=CUDA, requires_grad=True)
    upstream = torch.randn(3, 70, 256, device=CUDA)
    fused = norm(x)
    behind_view = fused.grad_fn.next_functions[0][0]  # the wrapper reshapes the kernel's output
    assert type(behind_view).__name__ == "LayerNormFnBackward"
    with torch.no_grad():
        reference = norm(x)  # the PyTorch path
    assert rel(fused, reference) < 1e-6
    fused_grads = torch.autograd.grad((fused * upstream).sum(), (x, norm.weight))
    xd, wd = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    formula = wd * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    grads = torch.autograd.grad((formula * upstream.double()).sum(), (xd, wd))
    for got, want in zip(fused_grads, grads, strict=True):
        assert rel(got, want) < 1e-5


def within_ulps(
    got: torch.Tensor, want: torch.Tensor, rounded: torch.dtype, ulps: int | None = None
) -> bool:
    """Elementwise within ``ulps`` units in the last place of ``rounded``, the dtype the values
    were last rounded to. By default one when it is 16-bit (a float32 intermediate on a rounding
    boundary), four of float32 (the kernel's reduction order and ``1 / sqrt`` against
    PyTorch's ``rsqrt``)."""
    if ulps is None:
        ulps = 4 if rounded == torch.float32 else 1
    eps, tiny = torch.finfo(rounded).eps, torch.finfo(rounded).tiny
    bound = ulps * eps * want.float().abs().clamp(min=tiny) * 1.01
    return bool(((got.float() - want.float()).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width", [2048, 100])
def test_decoder_inference_kernels_equal_the_pytorch_path(dtype, width):
    """The residual add is exact, the norm and SiLU·mul are within one ulp of PyTorch's (float32
    intermediates; in 16-bit dtypes almost all elements equal), with a weight of the same or a
    wider dtype."""
    import torch.nn.functional as F

    from mmdistill.decoder import rms_norm
    from mmdistill.kernels.triton_decoder import add_rms_norm, silu_mul

    g = torch.Generator(device=CUDA).manual_seed(width)
    x = (torch.randn(3, 7, width, generator=g, device=CUDA) * 3).to(dtype)
    r = torch.randn(3, 7, width, generator=g, device=CUDA).to(dtype)
    for weight in (
        torch.randn(width, generator=g, device=CUDA).to(dtype),
        x.new_ones(width).float(),
    ):
        total, normed = add_rms_norm(x, r, weight, 1e-5)
        assert torch.equal(total, x + r)
        want = rms_norm(x + r, weight, 1e-5)
        assert normed.dtype == want.dtype and within_ulps(normed, want, dtype)
        if dtype != torch.float32:  # in float32 a row's rstd may differ in its last bit
            assert (normed != want).float().mean() < 0.05
        alone, normed_alone = add_rms_norm(x, None, weight, 1e-5)
        assert alone is x and within_ulps(normed_alone, rms_norm(x, weight, 1e-5), dtype)
    gate = (torch.randn(5, width, generator=g, device=CUDA) * 4).to(dtype)
    up = torch.randn(5, width, generator=g, device=CUDA).to(dtype)
    # SiLU·mul rounds twice (the activation, then the product), and Triton's exp is the
    # approximate ex2 where PyTorch calls expf: two ulps in 16 bits, eight in float32.
    ulps = 8 if dtype == torch.float32 else 2
    assert within_ulps(silu_mul(gate, up), F.silu(gate) * up, dtype, ulps)


def test_a_decoder_block_takes_the_inference_kernels_only_without_autograd(
    llama_teacher, monkeypatch
):
    """Under ``no_grad`` on CUDA the blocks run the fused kernels and give the PyTorch path's
    output (autograd on: the PyTorch path, differentiable)."""
    import copy

    from mmdistill.kernels import triton_decoder

    teacher = copy.deepcopy(llama_teacher).to(CUDA, torch.bfloat16)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 33), device=CUDA)
    calls = []
    real = triton_decoder.add_rms_norm
    monkeypatch.setattr(triton_decoder, "add_rms_norm", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = teacher(ids).logits
    layers = len(teacher.layers)
    assert len(calls) == 2 * layers + 1  # two norms per block (one with the add) + the final
    plain = teacher.requires_grad_(True)(ids).logits
    assert len(calls) == 2 * layers + 1 and plain.requires_grad
    assert rel(fused.float(), plain.float()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(2048, 2048), (6160, 2048), (92553, 2048), (37, 300)])
def test_batch1_gemv_equals_a_float64_product(dtype, n, k, monkeypatch):
    """The Triton GEMV (each block configuration) against float64, with and without a bias,
    and :func:`linear` takes it for one row only."""
    import torch.nn.functional as F

    from mmdistill.kernels import inference, triton_gemv

    g = torch.Generator(device=CUDA).manual_seed(n)
    weight = torch.randn(n, k, generator=g, device=CUDA).to(dtype)
    bias = torch.randn(n, generator=g, device=CUDA).to(dtype)
    x = torch.randn(1, 1, k, generator=g, device=CUDA).to(dtype)
    for b in (None, bias):
        got = triton_gemv.gemv(x, weight, b)
        exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
        assert got.shape == (1, 1, n) and rel(got, exact) < 4e-3
        assert rel(got, F.linear(x, weight, b)) < 4e-3
    calls = []
    real = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        inference.linear(x, weight, bias)
        inference.linear(x.expand(1, 2, k), weight, bias)  # two rows: cuBLAS
    inference.linear(x, weight.requires_grad_(), bias)  # autograd: cuBLAS
    assert calls == [x.shape]


def test_a_packed_mlp_gives_the_unpacked_output(llama_teacher):
    """``pack_projections`` on a CUDA block: one GEMM for gate and up, the same output, the
    parameters views of the packed buffer; moving the block unpacks it."""
    import copy

    import mmdistill

    student = mmdistill.seed(copy.deepcopy(llama_teacher), attention_layers="none")
    layer = student.layers[0].to(CUDA, torch.bfloat16)
    x = torch.randn(1, 1, layer.mlp.gate_proj.in_features, device=CUDA).to(torch.bfloat16)
    with torch.no_grad():
        mlp_before = layer.mlp(x)
        layer.pack_projections()
        weight, _ = layer.mlp._packed
        assert layer.mlp.gate_proj.weight.data_ptr() == weight.data_ptr()
        assert rel(layer.mlp(x), mlp_before) < 1e-2
    layer.to(torch.float32)
    assert layer.mlp._packed is None
