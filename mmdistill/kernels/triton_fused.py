"""Triton kernels of the mixer's fast path (imported only where Triton is installed).

Kernels around mamba-ssm's SSD kernels, each replacing a chain of eager PyTorch ops:

* :func:`conv_silu_expand` -- the causal depthwise conv + SiLU over ``[x | B | C]``, read straight
  from the packed in-projection output and written in the layout the SSD kernel wants: x and B
  repeated over the GQA group (``[b, l, h, p]``, ``[b, l, h, n]``), C per head. One pass replaces
  ``cat``, ``transpose``, ``pad``, ``conv1d``, ``silu``, ``repeat_interleave`` and the
  ``contiguous`` copies. Differentiable (its backward sums the group copies back).
* :func:`mixer_decode_step` -- one decode step in two kernels: the conv step (rolls the
  ``[b, conv_dim, k - 1]`` window in place, activates the new channels), then one recurrence
  step per head (softplus of dt, decay, state update in place, ``y = S·C + D x``) fused with the
  per-head gated RMSNorm.

All accumulate in float32. Pure-PyTorch equivalents live in :mod:`mmdistill.kernels.fused_reference`; the
GPU tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block_c(group: int) -> int:
    """Largest power of two <= 64 dividing ``group`` (a channel block never straddles a group)."""
    block = 64
    while group % block:
        block //= 2
    return block


@triton.jit
def _conv_fwd_kernel(
    X,
    W,
    BIAS,
    S,
    OUT,
    L,
    CH0,
    G,
    REPS,
    stride_xb,
    stride_xl,
    stride_sb,
    stride_sc,
    stride_st,
    stride_ob,
    stride_ol,
    stride_oh,
    K: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cl = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ch = CH0 + cl
    xb = X + pid_b * stride_xb
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    acc += tl.load(BIAS + ch).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        src = t - (K - 1) + j
        w = tl.load(W + ch * K + j).to(tl.float32)
        inside = (src >= 0) & (src < L)
        v = tl.load(
            xb + src.to(tl.int64)[:, None] * stride_xl + ch[None, :],
            mask=inside[:, None],
            other=0.0,
        ).to(tl.float32)
        if HAS_STATE:
            before = (src < 0) & (t < L)
            v += tl.load(
                S
                + pid_b * stride_sb
                + ch[None, :] * stride_sc
                + (src + K - 1)[:, None] * stride_st,
                mask=before[:, None],
                other=0.0,
            ).to(tl.float32)
        acc += v * w[None, :]
    y = (acc * tl.sigmoid(acc)).to(OUT.dtype.element_ty)
    grp = cl // G
    off = cl - grp * G
    base = OUT + pid_b * stride_ob + t.to(tl.int64)[:, None] * stride_ol + off[None, :]
    rows = (t < L)[:, None]
    for r in range(REPS):
        tl.store(base + (grp * REPS + r)[None, :] * stride_oh, y, mask=rows)


@triton.jit
def _conv_grad_pre(
    xb,
    sb,
    dob,
    W,
    bias,
    s,
    ch,
    grp,
    off,
    L,
    REPS,
    stride_xl,
    stride_sc,
    stride_st,
    stride_dl,
    stride_dh,
    K: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Gradient w.r.t. the conv pre-activation at positions ``s`` (zero outside ``[0, L)``)."""
    valid = (s >= 0) & (s < L)
    g = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    rows = dob + s.to(tl.int64)[:, None] * stride_dl + off[None, :]
    for r in range(REPS):
        g += tl.load(
            rows + (grp * REPS + r)[None, :] * stride_dh, mask=valid[:, None], other=0.0
        ).to(tl.float32)
    pre = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32) + bias[None, :]
    for i in tl.static_range(K):
        src = s - (K - 1) + i
        inside = (src >= 0) & (src < L)
        v = tl.load(
            xb + src.to(tl.int64)[:, None] * stride_xl + ch[None, :],
            mask=inside[:, None],
            other=0.0,
        ).to(tl.float32)
        if HAS_STATE:
            before = (src < 0) & valid
            v += tl.load(
                sb + ch[None, :] * stride_sc + (src + K - 1)[:, None] * stride_st,
                mask=before[:, None],
                other=0.0,
            ).to(tl.float32)
        pre += v * tl.load(W + ch * K + i).to(tl.float32)[None, :]
    sig = tl.sigmoid(pre)
    return g * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _conv_bwd_kernel(
    X,
    W,
    BIAS,
    S,
    DOUT,
    DX,
    DW,
    DB,
    L,
    CH0,
    G,
    REPS,
    C_TOTAL,
    ROWS,
    stride_xb,
    stride_xl,
    stride_sb,
    stride_sc,
    stride_st,
    stride_db_,
    stride_dl,
    stride_dh,
    stride_dxb,
    stride_dxl,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    n_lblocks = tl.num_programs(0)
    cl = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ch = CH0 + cl
    grp = cl // G
    off = cl - grp * G
    xb = X + pid_b * stride_xb
    sb = S + pid_b * stride_sb
    dob = DOUT + pid_b * stride_db_
    bias = tl.load(BIAS + ch).to(tl.float32)
    kcols = tl.arange(0, KP)
    dw = tl.zeros((BLOCK_C, KP), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row0 = pid_l * ROWS
    for start in range(row0, tl.minimum(row0 + ROWS, L), BLOCK_L):
        t = start + tl.arange(0, BLOCK_L)
        dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        for j in tl.static_range(K):
            gp = _conv_grad_pre(
                xb, sb, dob, W, bias, t + (K - 1 - j), ch, grp, off, L, REPS, stride_xl,
                stride_sc, stride_st, stride_dl, stride_dh, K, HAS_STATE, BLOCK_L, BLOCK_C,
            )  # fmt: skip
            dx += gp * tl.load(W + ch * K + j).to(tl.float32)[None, :]
        tl.store(
            DX + pid_b * stride_dxb + t.to(tl.int64)[:, None] * stride_dxl + cl[None, :],
            dx.to(DX.dtype.element_ty),
            mask=(t < L)[:, None],
        )
        g0 = _conv_grad_pre(
            xb, sb, dob, W, bias, t, ch, grp, off, L, REPS, stride_xl, stride_sc, stride_st,
            stride_dl, stride_dh, K, HAS_STATE, BLOCK_L, BLOCK_C,
        )  # fmt: skip
        db += tl.sum(g0, axis=0)
        for j in tl.static_range(K):
            src = t - (K - 1) + j
            inside = (src >= 0) & (src < L)
            v = tl.load(
                xb + src.to(tl.int64)[:, None] * stride_xl + ch[None, :],
                mask=inside[:, None],
                other=0.0,
            ).to(tl.float32)
            if HAS_STATE:
                before = (src < 0) & (t < L)
                v += tl.load(
                    sb + ch[None, :] * stride_sc + (src + K - 1)[:, None] * stride_st,
                    mask=before[:, None],
                    other=0.0,
                ).to(tl.float32)
            contrib = tl.sum(g0 * v, axis=0)
            dw += tl.where(kcols[None, :] == j, contrib[:, None], 0.0)
    part = pid_b * n_lblocks + pid_l
    tl.store(
        DW + (part * C_TOTAL + ch)[:, None] * K + kcols[None, :],
        dw,
        mask=(kcols < K)[None, :],
    )
    tl.store(DB + part * C_TOTAL + ch, db)


def _regions(groups: int, heads: int, p: int, n: int) -> list[tuple[int, int, int, int]]:
    """``(channel offset, per-group width, groups, repeats)`` of the x, B and C regions."""
    return [
        (0, p, groups, heads // groups),
        (groups * p, n, groups, heads // groups),
        (groups * (p + n), n, heads, 1),
    ]


def _conv_forward(xbc, weight, bias, state, heads, groups, p, n, out_dtype):
    b, l, c_total = xbc.shape
    k = weight.shape[-1]
    w = weight.reshape(c_total, k)
    outs = [
        torch.empty(b, l, heads, width, device=xbc.device, dtype=out_dtype) for width in (p, n, n)
    ]
    if l == 0:
        return outs
    block_l = 64
    has_state = state is not None and k > 1
    s = state if has_state else xbc
    s_strides = (s.stride(0), s.stride(1), s.stride(2)) if has_state else (0, 0, 0)
    for (ch0, width, ngroups, reps), out in zip(_regions(groups, heads, p, n), outs, strict=True):
        block_c = _block_c(width)
        grid = (triton.cdiv(l, block_l), ngroups * width // block_c, b)
        _conv_fwd_kernel[grid](
            xbc, w, bias, s, out, l, ch0, width, reps,
            xbc.stride(0), xbc.stride(1), *s_strides,
            out.stride(0), out.stride(1), out.stride(2),
            K=k, HAS_STATE=has_state, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return outs


def _conv_backward(grads, xbc, weight, bias, state, heads, groups, p, n):
    b, l, c_total = xbc.shape
    k = weight.shape[-1]
    w = weight.reshape(c_total, k)
    dx = torch.empty(b, l, c_total, device=xbc.device, dtype=xbc.dtype)
    block_l = 32
    rows = max(block_l, min(1024, triton.cdiv(l, block_l) * block_l))
    n_lblocks = triton.cdiv(l, rows)
    dw = torch.empty(b * n_lblocks, c_total, k, device=xbc.device, dtype=torch.float32)
    db = torch.empty(b * n_lblocks, c_total, device=xbc.device, dtype=torch.float32)
    has_state = state is not None and k > 1
    s = state if has_state else xbc
    s_strides = (s.stride(0), s.stride(1), s.stride(2)) if has_state else (0, 0, 0)
    for (ch0, width, ngroups, reps), grad in zip(_regions(groups, heads, p, n), grads, strict=True):
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        block_c = _block_c(width)
        grid = (n_lblocks, ngroups * width // block_c, b)
        _conv_bwd_kernel[grid](
            xbc, w, bias, s, grad, dx[..., ch0:], dw, db, l, ch0, width, reps, c_total, rows,
            xbc.stride(0), xbc.stride(1), *s_strides,
            grad.stride(0), grad.stride(1), grad.stride(2),
            dx.stride(0), dx.stride(1),
            K=k, KP=triton.next_power_of_2(k), HAS_STATE=has_state,
            BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    dweight = dw.sum(0).view_as(weight).to(weight.dtype)
    dbias = db.sum(0).to(bias.dtype)
    return dx, dweight, dbias


class _ConvSiluExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xbc, weight, bias, state, heads, groups, p, n):
        outs = _conv_forward(xbc, weight, bias, state, heads, groups, p, n, xbc.dtype)
        ctx.save_for_backward(xbc, weight, bias, state)
        ctx.sizes = (heads, groups, p, n)
        return tuple(outs)

    @staticmethod
    def backward(ctx, dx_rep, db_rep, dc):
        xbc, weight, bias, state = ctx.saved_tensors
        heads, groups, p, n = ctx.sizes
        b, l = xbc.shape[:2]
        grads = [
            g if g is not None else xbc.new_zeros(b, l, heads, width)
            for g, width in zip((dx_rep, db_rep, dc), (p, n, n), strict=True)
        ]
        dxbc, dweight, dbias = _conv_backward(grads, xbc, weight, bias, state, heads, groups, p, n)
        return dxbc, dweight, dbias, None, None, None, None, None


def conv_silu_expand(
    xbc: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    state: torch.Tensor | None,
    heads: int,
    groups: int,
    head_dim: int,
    d_state: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal depthwise conv + SiLU over ``[x | B | C]``, written in the SSD kernel's layout.

    Args:
        xbc: ``[b, l, conv_dim]`` pre-activation channels (any row stride; channels contiguous),
            ``conv_dim = groups * (head_dim + d_state) + heads * d_state``.
        weight: ``[conv_dim, 1, k]`` depthwise kernel; bias: ``[conv_dim]``.
        state: ``[b, conv_dim, k - 1]`` inputs preceding ``xbc`` (no gradient), or ``None``
            (zeros).
        heads, groups, head_dim, d_state: ``h``, ``g``, ``p``, ``n``.

    Returns:
        ``x`` ``[b, l, h, p]`` and ``B`` ``[b, l, h, n]`` (each group's channels repeated for its
        ``h / g`` heads) and ``C`` ``[b, l, h, n]``, contiguous, in ``xbc.dtype``.
    """
    if xbc.stride(-1) != 1:
        xbc = xbc.contiguous()
    if state is not None:
        state = state.detach()
    return _ConvSiluExpand.apply(xbc, weight, bias, state, heads, groups, head_dim, d_state)


@triton.jit
def _conv_step_kernel(
    XT,
    S,
    W,
    BIAS,
    OUT,
    C,
    stride_xb,
    stride_sb,
    stride_sc,
    stride_st,
    stride_ob,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = ch < C
    xt = tl.load(XT + pid_b * stride_xb + ch, mask=m, other=0.0).to(tl.float32)
    acc = tl.load(BIAS + ch, mask=m, other=0.0).to(tl.float32)
    acc += xt * tl.load(W + ch * K + (K - 1), mask=m, other=0.0).to(tl.float32)
    sb = S + pid_b * stride_sb + ch * stride_sc
    for j in tl.static_range(K - 1):
        v = tl.load(sb + j * stride_st, mask=m, other=0.0).to(tl.float32)
        acc += v * tl.load(W + ch * K + j, mask=m, other=0.0).to(tl.float32)
    # Roll the window left by one (each channel belongs to this program alone).
    for j in tl.static_range(K - 2):
        tl.store(sb + j * stride_st, tl.load(sb + (j + 1) * stride_st, mask=m), mask=m)
    if K > 1:
        tl.store(sb + (K - 2) * stride_st, xt.to(S.dtype.element_ty), mask=m)
    tl.store(OUT + pid_b * stride_ob + ch, acc * tl.sigmoid(acc), mask=m)


@triton.jit
def _ssm_step_kernel(
    XBC,
    ZP,
    DTP,
    DT_BIAS,
    A_LOG,
    D,
    NW,
    S,
    Y,
    YTMP,
    H,
    P,
    N,
    OFF_B,
    OFF_C,
    REP,
    stride_xbc,
    stride_z,
    stride_dt,
    stride_sb,
    stride_sh,
    stride_sp,
    stride_y,
    eps,
    HAS_D: tl.constexpr,
    GATE_BEFORE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    grp = pid_h // REP
    nn = tl.arange(0, BLOCK_N)
    n_ok = nn < N
    xbc = XBC + pid_b * stride_xbc
    b_vec = tl.load(xbc + OFF_B + grp * N + nn, mask=n_ok, other=0.0).to(tl.float32)
    c_vec = tl.load(xbc + OFF_C + pid_h * N + nn, mask=n_ok, other=0.0).to(tl.float32)
    dt = tl.load(DTP + pid_b * stride_dt + pid_h).to(tl.float32)
    dt += tl.load(DT_BIAS + pid_h).to(tl.float32)
    dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    decay = tl.exp(-dt * tl.exp(tl.load(A_LOG + pid_h).to(tl.float32)))
    if HAS_D:
        d_skip = tl.load(D + pid_h).to(tl.float32)
    state = S + pid_b * stride_sb + pid_h * stride_sh
    ytmp = YTMP + (pid_b * H + pid_h) * P
    zrow = ZP + pid_b * stride_z + pid_h * P
    sumsq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        p_ok = pp < P
        x = tl.load(xbc + grp * P + pp, mask=p_ok, other=0.0).to(tl.float32)
        ptrs = state + pp[:, None] * stride_sp + nn[None, :]
        ok = p_ok[:, None] & n_ok[None, :]
        s = tl.load(ptrs, mask=ok, other=0.0)
        s = s * decay + (dt * x)[:, None] * b_vec[None, :]
        tl.store(ptrs, s, mask=ok)
        y = tl.sum(s * c_vec[None, :], axis=1)
        if HAS_D:
            y += d_skip * x
        if GATE_BEFORE:
            z = tl.load(zrow + pp, mask=p_ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        y = tl.where(p_ok, y, 0.0)
        sumsq += y * y
        tl.store(ytmp + pp, y, mask=p_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / P + eps)
    tl.debug_barrier()
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        p_ok = pp < P
        y = tl.load(ytmp + pp, mask=p_ok, other=0.0) * rstd
        y = y * tl.load(NW + pid_h * P + pp, mask=p_ok, other=0.0).to(tl.float32)
        if not GATE_BEFORE:
            z = tl.load(zrow + pp, mask=p_ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(Y + pid_b * stride_y + pid_h * P + pp, y.to(Y.dtype.element_ty), mask=p_ok)


def mixer_decode_step(
    zxbcdt: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor | None,
    norm_weight: torch.Tensor,
    heads: int,
    groups: int,
    head_dim: int,
    d_state: int,
    eps: float,
    gate_before: bool,
) -> torch.Tensor:
    """One decode step of a mixer from its packed in-projection to the gated-norm output.

    Args:
        zxbcdt: ``[b, h*p + conv_dim + h]`` packed in-projection of one token (any row stride).
        conv_state: ``[b, conv_dim, k - 1]``, rolled in place.
        ssm_state: ``[b, h, p, n]`` float32, advanced in place (last dim contiguous).
        conv_weight: ``[conv_dim, 1, k]``; conv_bias ``[conv_dim]``.
        dt_bias, A_log: ``[h]``; D: ``[h]`` or ``None``; norm_weight: ``[h*p]``.
        heads, groups, head_dim, d_state: ``h``, ``g``, ``p``, ``n``.
        eps: RMSNorm epsilon; gate_before: gate before the norm (else after).

    Returns:
        ``[b, h*p]`` in ``zxbcdt.dtype``: the input of ``out_proj``.
    """
    b = zxbcdt.shape[0]
    h, g, p, n = heads, groups, head_dim, d_state
    c_total = g * (p + n) + h * n
    k = conv_weight.shape[-1]
    if zxbcdt.stride(-1) != 1:
        zxbcdt = zxbcdt.contiguous()
    if ssm_state.stride(-1) != 1:
        raise ValueError("ssm_state must be contiguous in its last dimension")
    xbc_in = zxbcdt[:, h * p : h * p + c_total]
    act = torch.empty(b, c_total, device=zxbcdt.device, dtype=torch.float32)
    block_c = 256
    state = conv_state if k > 1 else act
    _conv_step_kernel[(b, triton.cdiv(c_total, block_c))](
        xbc_in, state, conv_weight.reshape(c_total, k), conv_bias, act, c_total,
        zxbcdt.stride(0),
        state.stride(0) if k > 1 else 0, state.stride(1) if k > 1 else 0,
        state.stride(2) if k > 1 else 0, act.stride(0),
        K=k, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    y = torch.empty(b, h * p, device=zxbcdt.device, dtype=zxbcdt.dtype)
    ytmp = torch.empty(b, h, p, device=zxbcdt.device, dtype=torch.float32)
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(triton.next_power_of_2(p), 8192 // block_n))
    _ssm_step_kernel[(b, h)](
        act, zxbcdt, zxbcdt[:, h * p + c_total :], dt_bias, A_log, D if D is not None else dt_bias,
        norm_weight, ssm_state, y, ytmp,
        h, p, n, g * p, g * (p + n), h // g,
        act.stride(0), zxbcdt.stride(0), zxbcdt.stride(0),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0),
        eps,
        HAS_D=D is not None, GATE_BEFORE=gate_before, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=8 if block_p * block_n >= 8192 else 4,
    )  # fmt: skip
    return y
