"""Rotary frequencies that depend on the call's positions (dynamic NTK, LongRoPE) are computed on
the device, without reading the positions on the host (so a captured decode step runs them):
checked against transformers' formulas written out in Python floats."""

from __future__ import annotations

import math

import torch

from mmdistill.decoder import Rotary, StackConfig

HEAD, THETA, MAX_POS = 16, 10000.0, 32


def _stack(**scaling) -> StackConfig:
    return StackConfig(
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=HEAD,
        intermediate_size=32,
        rope_theta=THETA,
        rope_scaling=scaling,
        max_position_embeddings=MAX_POS,
    )


def test_dynamic_ntk_grows_the_base_past_the_trained_length():
    rotary = Rotary(_stack(rope_type="dynamic", factor=2.0))
    for seq_len in (5, MAX_POS, MAX_POS + 1, 3 * MAX_POS):
        base = THETA
        if seq_len > MAX_POS:
            base = THETA * ((2.0 * seq_len / MAX_POS) - 1.0) ** (HEAD / (HEAD - 2))
        inv = [1.0 / base ** (2 * i / HEAD) for i in range(HEAD // 2)]
        cos, sin = rotary(torch.tensor([[seq_len - 1]]), torch.float64)
        want = torch.tensor([math.cos((seq_len - 1) * f) for f in inv], dtype=torch.float64)
        torch.testing.assert_close(cos[0, 0, : HEAD // 2], want, rtol=1e-5, atol=1e-5)
        want_sin = torch.tensor([math.sin((seq_len - 1) * f) for f in inv], dtype=torch.float64)
        torch.testing.assert_close(sin[0, 0, : HEAD // 2], want_sin, rtol=1e-5, atol=1e-5)


def test_longrope_switches_factors_past_the_original_length():
    short, long = (
        [1.0 + 0.1 * i for i in range(HEAD // 2)],
        [2.0 + 0.5 * i for i in range(HEAD // 2)],
    )
    rotary = Rotary(
        _stack(
            rope_type="longrope",
            short_factor=short,
            long_factor=long,
            original_max_position_embeddings=MAX_POS // 2,
        )
    )
    for seq_len, factors in ((MAX_POS // 2, short), (MAX_POS // 2 + 1, long)):
        cos, _ = rotary(torch.arange(seq_len)[None], torch.float64)
        scale = math.sqrt(1 + math.log(MAX_POS / (MAX_POS // 2)) / math.log(MAX_POS // 2))
        inv = [1.0 / (factors[i] * THETA ** (2 * i / HEAD)) for i in range(HEAD // 2)]
        want = torch.tensor([scale * math.cos((seq_len - 1) * f) for f in inv], dtype=torch.float64)
        torch.testing.assert_close(cos[0, -1, : HEAD // 2], want, rtol=1e-5, atol=1e-5)
