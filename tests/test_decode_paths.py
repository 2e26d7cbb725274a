"""Decode-path plumbing on CPU: packed projections, in-place cache updates, the static KV cache,
and the PyTorch references of the fused kernels against the mixer's own computation."""

from __future__ import annotations

import pytest
import torch
from generation_harness import cached_logits, check_cached_generation

from mmdistill.bench import random_model
from mmdistill.cached_forward import prefill
from mmdistill.kernels.fused_reference import (
    conv_silu_expand_ref,
    mixer_decode_step,
    mixer_decode_step_ref,
)
from mmdistill.mixer import Mamba2Mixer, MixerConfig, MixerState
from mmdistill.model import LMCache
from mmdistill.seeding import seed


def make_mixer(bias=False, use_D=False, conv_kernel=3, gate_order="before_norm"):
    torch.manual_seed(0)
    cfg = MixerConfig(
        hidden_size=24,
        num_heads=6,
        num_kv_heads=2,
        head_dim=4,
        d_state=5,
        conv_kernel=conv_kernel,
        qkv_bias=bias,
        use_D=use_D,
        gate_order=gate_order,
        chunk_size=8,
        backend="torch",
    )
    m = Mamba2Mixer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


@pytest.mark.parametrize("bias", [False, True])
def test_packed_projections_same_outputs_and_gradients(bias):
    m = make_mixer(bias=bias)
    u = torch.randn(2, 11, 24)
    with torch.no_grad():
        before = m(u)
    m.pack_projections()
    assert m._packed_weight is not None
    assert m.x_proj.weight.data_ptr() == m._packed_weight[m.z_proj.out_features :].data_ptr()
    ptrs = [p.data_ptr() for p in m.parameters()]
    m.pack_projections()  # again: the same buffer (a captured graph keeps reading it)
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    with torch.no_grad():
        torch.testing.assert_close(m(u), before, rtol=0, atol=0)
    m(u).sum().backward()  # training still reaches every parameter
    assert all(p.grad is not None for p in m.parameters())
    m.to(torch.float64)  # moving unpacks
    assert m._packed_weight is None
    with torch.no_grad():
        torch.testing.assert_close(m(u.double()).float(), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_mlp_same_outputs_and_gradients(bias):
    from mmdistill.decoder import MLP, StackConfig

    config = StackConfig(
        num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, intermediate_size=40,
        mlp_bias=bias,
    )  # fmt: skip
    mlp = MLP(24, config)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        before = mlp(x)
        mlp.pack_projections()
        weight, packed_bias = mlp._packed
        assert mlp.up_proj.weight.data_ptr() == weight[40:].data_ptr()
        assert (packed_bias is not None) == bias
        torch.testing.assert_close(mlp(x), before, rtol=1e-6, atol=1e-6)
    mlp(x).sum().backward()  # training runs each projection and reaches every parameter
    assert all(p.grad is not None for p in mlp.parameters())
    mlp.load_state_dict(mlp.state_dict())  # loading unpacks
    assert mlp._packed is None


def test_state_updated_in_place_without_grad():
    m = make_mixer()
    u = torch.randn(2, 20, 24)
    state = MixerState.zeros(m.config, 2, u.device, u.dtype)
    ptrs = state.conv.data_ptr(), state.ssm.data_ptr()
    with torch.no_grad():
        m(u[:, :13], state=state)
        m(u[:, 13:14], state=state)
        m(u[:, 14:], state=state)
    assert (state.conv.data_ptr(), state.ssm.data_ptr()) == ptrs
    state.reset()
    assert state.ssm.abs().sum() == 0 and state.conv.abs().sum() == 0


def test_state_prefill_with_grad_keeps_old_tensors():
    m = make_mixer()
    u = torch.randn(1, 9, 24, requires_grad=True)
    state = MixerState.zeros(m.config, 1, u.device, u.dtype)
    old = state.ssm
    out = m(u[:, :5], state=state)
    out = out.sum() + m(u[:, 5:], state=state).sum()
    out.backward()  # no in-place clash with tensors saved for backward
    assert state.ssm is not old and u.grad is not None


def test_conv_reference_matches_mixer_conv():
    m = make_mixer()
    c = m.config
    xbc = torch.randn(2, 17, c.conv_dim)
    state = MixerState.zeros(c, 2, xbc.device, xbc.dtype)
    state.conv.normal_()
    initial = state.conv.clone()
    x, B, C = conv_silu_expand_ref(
        xbc, m.conv1d.weight, m.conv1d.bias, initial, 6, 2, c.head_dim, c.d_state
    )
    with torch.no_grad():
        ref = m._conv(xbc, state)
    xr, Br, Cr = ref.split([2 * 4, 2 * 5, 6 * 5], dim=-1)
    torch.testing.assert_close(x, xr.reshape(2, 17, 2, 4).repeat_interleave(3, 2))
    torch.testing.assert_close(B, Br.reshape(2, 17, 2, 5).repeat_interleave(3, 2))
    torch.testing.assert_close(C, Cr.reshape(2, 17, 6, 5))


@pytest.mark.parametrize(
    "gate_order,use_D,conv_kernel", [("before_norm", False, 2), ("after_norm", True, 4)]
)
def test_decode_reference_matches_mixer_step(gate_order, use_D, conv_kernel):
    m = make_mixer(use_D=use_D, conv_kernel=conv_kernel, gate_order=gate_order)
    c = m.config
    u = torch.randn(3, 12, 24)
    s1 = MixerState.zeros(c, 3, u.device, u.dtype)
    with torch.no_grad():
        m(u[:, :11], state=s1)
        s2 = MixerState(s1.conv.clone(), s1.ssm.clone())
        expected = m(u[:, 11:], state=s1)
        packed = m._packed_in_proj(u[:, 11])
        args = (
            m.conv1d.weight,
            m.conv1d.bias,
            m.dt_bias,
            m.A_log,
            m.D,
            m.norm_weight,
            6,
            2,
            c.head_dim,
            c.d_state,
            c.norm_eps,
            gate_order == "before_norm",
        )
        y = mixer_decode_step_ref(packed, s2.conv, s2.ssm, *args)
        torch.testing.assert_close(m.out_proj(y)[:, None], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s2.ssm, s1.ssm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s2.conv, s1.conv)
        s3 = MixerState(s1.conv.clone(), s1.ssm.clone())
        y_op = mixer_decode_step(packed, s3.conv, s3.ssm, *args)  # the custom op on CPU
        y_ref = mixer_decode_step_ref(packed, s1.conv, s1.ssm, *args)
        torch.testing.assert_close(y_op, y_ref)
        torch.testing.assert_close(s3.ssm, s1.ssm)


@pytest.fixture(scope="module")
def tiny():
    teacher = random_model("tiny", "cpu", torch.float32, seed=0)
    return teacher, seed(teacher, "every:2")


def test_static_kv_cache_matches_growing(tiny):
    """Teacher and hybrid, growing and static KV caches: cached inference == full forward."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    for model in tiny:
        growing, g_cache = check_cached_generation(model, ids, 30, chunk_size=8)
        static, s_cache = check_cached_generation(model, ids, 30, chunk_size=8, max_length=48)
        torch.testing.assert_close(static, growing, rtol=1e-5, atol=1e-5)
        attn = [s for s in s_cache.layers if hasattr(s, "k_buffer")]
        assert all(s.capacity == 48 and s.length == 40 and s.k.shape[2] == 40 for s in attn)
        assert s_cache.nbytes() > g_cache.nbytes()  # the buffers are preallocated in full


def test_chunked_prefill_embeds_a_text_prompt_a_chunk_at_a_time(tiny, monkeypatch):
    """No tensor the length of the prompt: a text prompt is embedded chunk by chunk, and the
    hybrid's chunked prefill gives the one-pass logits."""
    _, hybrid = tiny
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(1))
    embedded = []
    real = type(hybrid).embed

    def recording(self, input_ids, *args, **kwargs):
        embedded.append(input_ids.shape[1])
        return real(self, input_ids, *args, **kwargs)

    with torch.no_grad():
        one_pass = prefill(hybrid, LMCache(hybrid, 1, ids.device, hybrid.dtype), ids)
        monkeypatch.setattr(type(hybrid), "embed", recording)
        chunked = prefill(hybrid, LMCache(hybrid, 1, ids.device, hybrid.dtype), ids, chunk_size=8)
    assert embedded == [8, 8, 5]
    torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-5)


def test_static_kv_cache_full_and_select(tiny):
    teacher, _ = tiny
    ids = torch.randint(0, 256, (2, 12))
    cache = LMCache(teacher, 2, ids.device, teacher.dtype, max_length=10)
    with pytest.raises(ValueError, match="capacity"), torch.no_grad():
        prefill(teacher, cache, ids)
    _, cache = cached_logits(teacher, ids, 8, chunk_size=8, max_length=16)
    cache.select(torch.tensor([1, 1, 0]))
    assert cache.layers[0].k.shape == (3, 2, 12, 32) and cache.layers[0].capacity == 16
    torch.testing.assert_close(cache.layers[0].k[0], cache.layers[0].k[1])
    cache.reset()
    assert cache.seen == 0 and cache.layers[0].length == 0 and cache.layers[0].k.shape[2] == 0


def test_attention_reading_a_cache_leaves_cudnn_out(tiny, monkeypatch):
    """cuDNN's per-shape set-up costs tens of milliseconds per decode step on an H100
    (docs/benchmarks.md), so attention that reads earlier tokens from a cache restricts SDPA to
    the other backends; a prompt's first pass keeps PyTorch's default. Recorded on CPU by
    wrapping the context manager the decoder uses; the logits stay those of the unrestricted
    computation."""
    from mmdistill import decoder

    calls = []
    real = decoder.sdpa_kernel

    def recording(backends, *args, **kwargs):
        calls.append(list(backends))
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(decoder, "sdpa_kernel", recording)
    teacher, _ = tiny
    layers = sum(1 for t in teacher.config.layer_types if t == "attention")
    ids = torch.randint(0, 256, (1, 20))
    cache = LMCache(teacher, 1, ids.device, teacher.dtype)
    with torch.no_grad():
        prefill(teacher, cache, ids[:, :12])  # first pass: as many keys as queries
        assert calls == []
        prefill(teacher, cache, ids[:, 12:16], chunk_size=2)  # later chunks read the cache
        stepped = teacher(ids[:, 16:17], cache=cache).logits[:, -1]
        full = teacher(ids[:, :17]).logits[:, -1]
    assert len(calls) == 3 * layers
    assert all(c == decoder.CACHED_SDPA_BACKENDS for c in calls)
    assert torch.nn.attention.SDPBackend.CUDNN_ATTENTION not in decoder.CACHED_SDPA_BACKENDS
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


def naive_attention_f64(q, k, v, length):
    """One query per head over the first ``length`` positions, float64, one head at a time."""
    b, heads, d = q.shape
    group = heads // k.shape[1]
    out = torch.empty(b, heads, d, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            keys = k[i, h // group, :length].double()
            weights = torch.softmax(keys @ q[i, h].double() / d**0.5, dim=0)
            out[i, h] = weights @ v[i, h // group, :length].double()
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("length", [1, 17, 40])
def test_decode_attention_reference_masks_past_the_fill_level(heads, kv_heads, length):
    from mmdistill.kernels.attention import decode_attention, decode_attention_ref

    g = torch.Generator().manual_seed(length * 10 + heads)
    q = torch.randn(3, heads, 16, generator=g)
    k = torch.randn(3, kv_heads, 40, 16, generator=g)
    v = torch.randn(3, kv_heads, 40, 16, generator=g)
    k[:, :, length:] = 50.0  # garbage past the fill level would dominate a softmax over it
    fill = torch.tensor([length])
    expected = naive_attention_f64(q, k, v, length)
    exact = decode_attention_ref(q.double(), k.double(), v.double(), fill)
    torch.testing.assert_close(exact, expected)
    for out in (decode_attention_ref(q, k, v, fill), decode_attention(q, k, v, fill)):  # op: CPU
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_device_tracked_kv_cache_matches_static(tiny):
    """The graph decoder's path on CPU: attention layers keep their fill level on the device,
    one-token steps write at it and attend over the whole buffer through decode_attention, the
    caller advances the Python count. Same logits as the plain static cache, including a
    one-token last prefill chunk, a copy from a batch-1 cache, and a reset."""
    _, hybrid = tiny
    ids = torch.randint(0, 256, (2, 40))
    expected, _ = cached_logits(hybrid, ids, 25, chunk_size=8, max_length=48)
    cache = LMCache(hybrid, 2, ids.device, hybrid.dtype, max_length=48)
    attn = [s for s in cache.layers if hasattr(s, "k_buffer")]
    for state in attn:
        state.track_on_device()
    with torch.no_grad():
        steps = [prefill(hybrid, cache, ids[:, :25], chunk_size=8)]  # chunks 8, 8, 8, 1
        assert all(s.length == 24 and int(s.slot) == 25 for s in attn)
        for state in attn:
            state.sync_length()
        for t in range(25, 40):
            steps.append(hybrid(ids[:, t : t + 1], cache=cache).logits[:, -1])
            for state in attn:
                state.advance()
    torch.testing.assert_close(torch.stack(steps, 1), expected, rtol=1e-5, atol=1e-5)
    assert all(s.length == 40 and int(s.slot) == 40 and s.k.shape[2] == 40 for s in attn)

    _, one_row = cached_logits(hybrid, ids[:1], 25, chunk_size=8)
    for dst, src in zip(cache.layers, one_row.layers, strict=True):
        dst.copy_(src)  # batch 1 broadcast into the two rows
    assert all(s.length == 40 and int(s.slot) == 40 for s in attn)
    torch.testing.assert_close(attn[0].k[1], one_row.layers[attn_index(cache)].k[0])
    cache.reset()
    assert all(s.length == 0 and int(s.slot) == 0 for s in attn)
    attn[0].advance(48)
    with pytest.raises(ValueError, match="full"):
        attn[0].check_room(1)


def attn_index(cache):
    return next(i for i, s in enumerate(cache.layers) if hasattr(s, "k_buffer"))


def test_graph_decoder_checks_the_model_before_capturing(tiny):
    """Attention layers need a static-cache capacity, a window is refused, and everything else
    needs CUDA: clear errors before any capture (these run on CPU)."""
    import copy

    from mmdistill.graph_decode import GraphDecoder

    teacher, hybrid = tiny
    with pytest.raises(ValueError, match="are attention: give max_length"):
        GraphDecoder(hybrid, 2)
    with pytest.raises(ValueError, match="at least 4"):
        GraphDecoder(hybrid, 2, max_length=3)
    windowed = copy.deepcopy(teacher)
    windowed.config.stacks[0].sliding_window = 16
    with pytest.raises(ValueError, match="sliding-window"):
        GraphDecoder(windowed, 1, max_length=64)
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(hybrid, 2, max_length=64)


def test_padded_linear_equals_linear_in_outputs_and_gradients():
    """The LM head's padded GEMM (used on CUDA for odd vocabularies) against ``F.linear``, in
    float64: the same outputs and the same input, weight and bias gradients."""
    from mmdistill.decoder import padded_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(37, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(3, 5, 37, dtype=torch.float64, generator=g)
    outs, grads = [], []
    for fn in (lambda: torch.nn.functional.linear(x, w, b), lambda: padded_linear(x, w, b, 64)):
        out = fn()
        outs.append(out)
        grads.append(torch.autograd.grad((out * upstream).sum(), (x, w, b)))
    assert outs[1].shape == (3, 5, 37)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for padded, plain in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)
