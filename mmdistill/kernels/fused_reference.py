"""The mixer's fused stages: PyTorch references and the dispatch to the Triton kernels.

Two stages of :class:`~mmdistill.mixer.Mamba2Mixer` have a fused Triton kernel on CUDA
(:mod:`mmdistill.kernels.triton_fused`, imported only when used) and a PyTorch reference here
that computes the same function (the GPU tests compare them):

* :func:`conv_silu_expand_ref` -- causal depthwise conv + SiLU over ``[x | B | C]``, returning
  x and B repeated over the GQA group and C per head (the SSD kernel's input layout);
* :func:`mixer_decode_step_ref` -- one decode step from the packed in-projection to the gated
  RMSNorm output (conv window roll, dt softplus, state update, ``y = S·C + D x``, gated norm).

``mixer_decode_step`` is also registered as the custom op ``mmdistill::mixer_decode_step`` so
that ``torch.compile`` treats it as one opaque, state-mutating call.
"""

import torch
import torch.nn.functional as F


def conv_silu_expand_ref(
    xbc: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    state: torch.Tensor | None,
    heads: int,
    groups: int,
    head_dim: int,
    d_state: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`mmdistill.kernels.triton_fused.conv_silu_expand` (same arguments).

    Returns:
        ``x`` ``[b, l, h, p]``, ``B`` ``[b, l, h, n]``, ``C`` ``[b, l, h, n]``.
    """
    b, l, channels = xbc.shape
    k = weight.shape[-1]
    seq = xbc.transpose(1, 2)
    if state is not None:
        seq = torch.cat([state.detach().to(seq.dtype), seq], dim=-1)
    else:
        seq = F.pad(seq, (k - 1, 0))
    out = F.silu(F.conv1d(seq, weight, bias, groups=channels)).transpose(1, 2)
    h, g, p, n = heads, groups, head_dim, d_state
    x, B, C = out.split([g * p, g * n, h * n], dim=-1)
    x = x.reshape(b, l, g, p).repeat_interleave(h // g, dim=2)
    B = B.reshape(b, l, g, n).repeat_interleave(h // g, dim=2)
    return x, B, C.reshape(b, l, h, n)


def mixer_decode_step_ref(
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
    """Reference of :func:`mmdistill.kernels.triton_fused.mixer_decode_step` (float32 math).

    Args:
        zxbcdt: ``[b, h*p + conv_dim + h]`` packed in-projection of one token.
        conv_state: ``[b, conv_dim, k - 1]``, rolled in place.
        ssm_state: ``[b, h, p, n]`` float32, advanced in place.

    Returns:
        ``[b, h*p]`` in ``zxbcdt.dtype``.
    """
    b = zxbcdt.shape[0]
    h, g, p, n = heads, groups, head_dim, d_state
    channels = g * (p + n) + h * n
    z, xbc, dt = zxbcdt.float().split([h * p, channels, h], dim=-1)
    k = conv_weight.shape[-1]
    window = torch.cat([conv_state.float(), xbc[..., None]], dim=-1)  # [b, channels, k]
    act = window.mul(conv_weight.float()[:, 0]).sum(-1) + conv_bias.float()
    act = F.silu(act)
    if k > 1:
        conv_state.copy_(window[..., 1:])
    x, B, C = act.split([g * p, g * n, h * n], dim=-1)
    x = x.view(b, g, p).repeat_interleave(h // g, dim=1)
    B = B.view(b, g, n).repeat_interleave(h // g, dim=1)
    C = C.view(b, h, n)
    dt = F.softplus(dt + dt_bias.float())
    decay = torch.exp(-dt * torch.exp(A_log.float()))
    new = ssm_state * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None]
    ssm_state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, C)
    if D is not None:
        y = y + x * D.float()[:, None]
    gate = F.silu(z.view(b, h, p))
    if gate_before:
        y = y * gate
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    y = y * norm_weight.float().view(h, p)
    if not gate_before:
        y = y * gate
    return y.reshape(b, h * p).to(zxbcdt.dtype)


@torch.library.custom_op("mmdistill::mixer_decode_step", mutates_args=("conv_state", "ssm_state"))
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
    """One mixer decode step: the Triton kernels on CUDA, the reference elsewhere.

    Arguments and result as :func:`mixer_decode_step_ref`.
    """
    args = (
        zxbcdt,
        conv_state,
        ssm_state,
        conv_weight,
        conv_bias,
        dt_bias,
        A_log,
        D,
        norm_weight,
        heads,
        groups,
        head_dim,
        d_state,
        eps,
        gate_before,
    )
    if zxbcdt.is_cuda:
        from .triton_fused import mixer_decode_step as triton_step

        return triton_step(*args)
    return mixer_decode_step_ref(*args)


@mixer_decode_step.register_fake
def _mixer_decode_step_fake(
    zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight,
    heads, groups, head_dim, d_state, eps, gate_before,
):  # fmt: skip
    return zxbcdt.new_empty(zxbcdt.shape[0], heads * head_dim)


__all__ = ["conv_silu_expand_ref", "mixer_decode_step", "mixer_decode_step_ref"]
