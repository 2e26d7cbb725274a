"""The seeded Mamba-2 mixer: against an independent per-token float64 reference, cached decode
against the full forward, and left padding against unpadded rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmdistill.mixer import Mamba2Mixer, MixerConfig, MixerState


def make_mixer(
    conv_kernel=2,
    gate_order="before_norm",
    heads=6,
    kv=2,
    use_D=False,
    bias=False,
    dtype=torch.float64,
    seed=0,
):
    torch.manual_seed(seed)
    cfg = MixerConfig(
        hidden_size=24,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=4,
        d_state=4,
        conv_kernel=conv_kernel,
        gate_order=gate_order,
        use_D=use_D,
        qkv_bias=bias,
        chunk_size=8,
        backend="torch",
    )
    m = Mamba2Mixer(cfg).to(dtype)
    with torch.no_grad():  # perturb everything so no parameter sits at a trivial value
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def reference(m: Mamba2Mixer, u: torch.Tensor) -> torch.Tensor:
    """Token-by-token evaluation written independently of the module's vectorised code."""
    c = m.config
    h, g, p, n, k = c.num_heads, c.num_kv_heads, c.head_dim, c.d_state, c.conv_kernel
    u = u.double()

    def lin(mod, v):
        out = v @ mod.weight.double().T
        return out + mod.bias.double() if mod.bias is not None else out

    z, x, B, C = lin(m.z_proj, u), lin(m.x_proj, u), lin(m.b_proj, u), lin(m.c_proj, u)
    dt_raw = lin(m.dt_proj, u)
    xbc = torch.cat([x, B, C], -1)
    w = m.conv1d.weight.double()[:, 0]  # [channels, k]
    conv = torch.zeros_like(xbc)
    for t in range(u.shape[1]):
        acc = m.conv1d.bias.double().expand(u.shape[0], -1).clone()
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                acc = acc + w[:, j] * xbc[:, src]
        conv[:, t] = F.silu(acc)
    x, B, C = conv.split([g * p, g * n, h * n], -1)
    A = -torch.exp(m.A_log.double())
    dt = F.softplus(dt_raw + m.dt_bias.double())
    ys = torch.zeros(u.shape[0], u.shape[1], h, p, dtype=torch.float64)
    for b in range(u.shape[0]):
        for head in range(h):
            grp = head // (h // g)
            S = torch.zeros(p, n, dtype=torch.float64)
            for t in range(u.shape[1]):
                xv = x[b, t, grp * p : (grp + 1) * p]
                Bv = B[b, t, grp * n : (grp + 1) * n]
                Cv = C[b, t, head * n : (head + 1) * n]
                S = torch.exp(dt[b, t, head] * A[head]) * S + dt[b, t, head] * torch.outer(xv, Bv)
                ys[b, t, head] = S @ Cv
                if m.D is not None:
                    ys[b, t, head] += m.D.double()[head] * xv
    y = ys.reshape(u.shape[0], u.shape[1], h * p)
    gate = F.silu(z)
    if c.gate_order == "before_norm":
        y = y * gate
    yh = y.view(*y.shape[:-1], h, p)
    yh = yh / torch.sqrt(yh.pow(2).mean(-1, keepdim=True) + c.norm_eps)
    y = yh.reshape(y.shape) * m.norm_weight.double()
    if c.gate_order == "after_norm":
        y = y * gate
    return lin(m.out_proj, y)


@pytest.mark.parametrize("conv_kernel", [2, 4])
@pytest.mark.parametrize("gate_order", ["before_norm", "after_norm"])
@pytest.mark.parametrize("kv,use_D,bias", [(2, False, False), (6, True, True), (3, True, False)])
def test_mixer_matches_reference(conv_kernel, gate_order, kv, use_D, bias):
    m = make_mixer(conv_kernel, gate_order, kv=kv, use_D=use_D, bias=bias)
    u = torch.randn(2, 19, 24, dtype=torch.float64)
    with torch.no_grad():
        out = m(u)
    assert torch.allclose(out, reference(m, u), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv_kernel", [2, 4])
def test_prefill_then_decode_equals_full_forward(conv_kernel):
    m = make_mixer(conv_kernel, dtype=torch.float32)
    u = torch.randn(3, 50, 24)
    with torch.no_grad():
        full = m(u)
        state = MixerState.zeros(m.config, 3, u.device, u.dtype)
        parts = [m(u[:, :21], state=state)]
        parts.append(m(u[:, 21:24], state=state))  # a few-token step
        for t in range(24, 50):
            parts.append(m(u[:, t : t + 1], state=state))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded_rows():
    m = make_mixer(4, dtype=torch.float32)
    lengths = [30, 17, 1]
    rows = [torch.randn(1, n, 24) for n in lengths]
    width = max(lengths)
    padded = torch.zeros(len(rows), width, 24)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, width - r.shape[1] :] = r[0] + 0  # real tokens at the right
        padded[i, : width - r.shape[1]] = torch.randn(width - r.shape[1], 24)  # junk padding
        mask[i, width - r.shape[1] :] = 1
    with torch.no_grad():
        out = m(padded, mask=mask)
        state = MixerState.zeros(m.config, len(rows), padded.device, padded.dtype)
        m(padded, state=state, mask=mask)
        nxt = torch.randn(len(rows), 1, 24)
        step = m(nxt, state=state)
        for i, r in enumerate(rows):
            alone = m(r)
            torch.testing.assert_close(out[i, width - r.shape[1] :], alone[0], rtol=1e-5, atol=1e-5)
            cont = m(torch.cat([r, nxt[i : i + 1]], 1))[:, -1]
            torch.testing.assert_close(step[i], cont, rtol=1e-5, atol=1e-5)


def test_seeded_initial_values():
    cfg = MixerConfig(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, conv_kernel=3)
    m = Mamba2Mixer(cfg)
    assert cfg.conv_dim == 2 * (8 + 8) + 4 * 8
    assert torch.equal(m.conv1d.weight[:, 0, -1], torch.ones(cfg.conv_dim))
    assert m.conv1d.weight[:, 0, :-1].abs().sum() == 0 and m.conv1d.bias.abs().sum() == 0
    assert m.dt_proj.weight.abs().sum() == 0
    dt = F.softplus(m.dt_bias)
    assert bool(((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all())
    assert torch.equal(m.A_log, torch.ones(4)) and m.D is None
    assert torch.equal(m.norm_weight, torch.ones(32))
    bound = 2**-2.5 * (6 / (16 + 32)) ** 0.5
    assert m.z_proj.weight.abs().max() <= bound and m.z_proj.weight.std() > bound / 4


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_heads=6, num_kv_heads=4), "num_heads"),
        (dict(head_dim=-1), "head_dim"),
        (dict(conv_kernel=0), "conv_kernel"),
        (dict(backend="cuda"), "backend"),
        (dict(gate_order="sideways"), "gate_order"),
    ],
)
def test_bad_config_names_parameter(kwargs, name):
    base = dict(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8)
    base.update(kwargs)
    with pytest.raises(ValueError, match=name):
        MixerConfig(**base)


def test_config_json_round_trip():
    cfg = MixerConfig(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, use_D=True)
    assert MixerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        MixerConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_chunk_size_defaults_per_backend_and_does_not_change_the_result():
    """An open chunk size picks 256 for mamba-ssm's kernels and 64 for the PyTorch SSD, survives
    the JSON round trip, and any chunk gives the same float64 output as the reference."""
    from mmdistill.mixer import CHUNK_DEFAULTS

    cfg = MixerConfig(hidden_size=24, num_heads=6, num_kv_heads=2, head_dim=4)
    assert cfg.chunk_size is None
    assert cfg.chunk_for("triton") == CHUNK_DEFAULTS["triton"] == 256
    assert cfg.chunk_for("torch") == CHUNK_DEFAULTS["torch"] == 64
    assert MixerConfig.from_dict(cfg.to_dict()).chunk_size is None
    assert MixerConfig(24, 6, 2, 4, chunk_size=32).chunk_for("triton") == 32
    base = make_mixer()
    u = torch.randn(2, 150, 24, dtype=torch.float64)
    expected = reference(base, u)
    for chunk in (None, 5, 256):
        m = make_mixer()
        m.config.chunk_size = chunk
        assert (m(u) - expected).abs().max() < 1e-10, chunk
