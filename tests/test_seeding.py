"""Seeding: weights come from the teacher's slices, layouts, cached generation, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from generation_harness import check_cached_generation

import mmdistill
from mmdistill.attention_layers import parse_attention_layers
from mmdistill.errors import CheckpointError, MmdistillError, ResourceError
from mmdistill.mixer import Mamba2Mixer


def test_layout_specs():
    assert parse_attention_layers("none", 8) == []
    assert parse_attention_layers("all", 3) == [0, 1, 2]
    assert parse_attention_layers("every:4", 32) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert parse_attention_layers("5, 1,1", 8) == [1, 5]
    with pytest.raises(ValueError, match="out of range.*8 layers"):
        parse_attention_layers("3,8", 8)
    with pytest.raises(ValueError, match="every:K"):
        parse_attention_layers("every:0", 8)
    with pytest.raises(ValueError, match="comma list"):
        parse_attention_layers("first-half", 8)


def test_all_layout_equals_teacher(llama_teacher):
    student = mmdistill.seed(llama_teacher, attention_layers="all")
    ids = torch.randint(0, 101, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(
            student(ids).logits, llama_teacher(ids).logits, rtol=0, atol=1e-6
        )


def test_seeded_weights_are_teacher_slices(llama_teacher):
    student = mmdistill.seed(llama_teacher, attention_layers="1", seed=3)
    assert student.config.layer_types == ["mamba", "attention", "mamba", "mamba"]
    for i in (0, 2, 3):
        attn = llama_teacher.layers[i].mixer
        mixer = student.layers[i].mixer
        assert isinstance(mixer, Mamba2Mixer)
        assert torch.equal(mixer.c_proj.weight, attn.q_proj.weight)
        assert torch.equal(mixer.b_proj.weight, attn.k_proj.weight)
        assert torch.equal(mixer.x_proj.weight, attn.v_proj.weight)
        assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
        assert mixer.c_proj.weight.data_ptr() != attn.q_proj.weight.data_ptr()  # a copy
        assert mixer.config.conv_dim == 2 * 8 * 2 + 6 * 8
    for name, p in student.named_parameters():
        if ".mixer." not in name:
            assert torch.equal(p, llama_teacher.get_parameter(name)), name
        assert p.requires_grad
    # Different seeds give different new parameters, same inherited ones.
    other = mmdistill.seed(llama_teacher, attention_layers="1", seed=4)
    assert not torch.equal(other.layers[0].mixer.dt_bias, student.layers[0].mixer.dt_bias)


def gated_linear_attention(attn, mixer, h: torch.Tensor) -> torch.Tensor:
    """What seeding promises, in float64 from the teacher's attention weights: causal linear
    attention (no softmax) over SiLU(q), SiLU(k), SiLU(v), each step weighted by ``dt`` and
    decayed by ``exp(A dt)`` per token, gated by SiLU(z), RMS-normalised per head, then W_O."""
    c = mixer.config
    heads, groups, p, n = c.num_heads, c.num_kv_heads, c.head_dim, c.d_state
    h = h.double()
    f = torch.nn.functional
    q = f.silu(f.linear(h, attn.q_proj.weight.double())).unflatten(-1, (heads, n))
    k = f.silu(f.linear(h, attn.k_proj.weight.double())).unflatten(-1, (groups, n))
    v = f.silu(f.linear(h, attn.v_proj.weight.double())).unflatten(-1, (groups, p))
    k, v = (t.repeat_interleave(heads // groups, dim=-2) for t in (k, v))
    dt = f.softplus(mixer.dt_bias.double())  # dt_proj starts at zero: one step size per head
    decay = -torch.exp(mixer.A_log.double()) * dt
    t = torch.arange(h.shape[1], dtype=torch.float64)
    lag = (t[:, None] - t[None, :]).clamp(min=0)
    causal = (t[:, None] >= t[None, :])[..., None]
    weight = torch.exp(lag[..., None] * decay) * dt * causal
    scores = torch.einsum("bthn,bshn->btsh", q, k) * weight
    y = torch.einsum("btsh,bshp->bthp", scores, v)
    y = y * f.silu(f.linear(h, mixer.z_proj.weight.double())).unflatten(-1, (heads, p))
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + c.norm_eps)
    y = y.flatten(-2) * mixer.norm_weight.double()
    return f.linear(y, attn.o_proj.weight.double())


def test_a_seeded_mixer_is_the_teachers_attention_without_softmax(llama_teacher):
    """mmMamba's seeding: before training, each mixer computes the teacher's attention with
    the softmax replaced by a decayed, dt-weighted linear form (checked against a float64
    computation from the teacher's own Q, K, V and O weights)."""
    student = mmdistill.seed(llama_teacher, attention_layers="none", seed=3)
    h = torch.randn(
        2, 19, llama_teacher.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    for i in range(llama_teacher.config.num_layers):
        attn, mixer = llama_teacher.layers[i].mixer, student.layers[i].mixer
        with torch.no_grad():
            got = mixer(h, backend="torch").double()
        torch.testing.assert_close(
            got, gated_linear_attention(attn, mixer, h), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("spec", ["none", "every:2"])
@pytest.mark.parametrize("conv_kernel", [2, 4])
@pytest.mark.parametrize("chunk", [None, 4])
def test_cached_generation_equals_recompute(llama_teacher, spec, conv_kernel, chunk):
    """Linear ("none") and hybrid students: prefill (one pass or chunks) + steps == full forward."""
    student = mmdistill.seed(
        llama_teacher, attention_layers=spec, mixer={"conv_kernel": conv_kernel}
    )
    ids = torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(0))
    check_cached_generation(student, ids, 11, chunk_size=chunk, new_tokens=12)


@pytest.mark.parametrize("spec", ["none", "every:2"])
def test_left_padded_generation_matches_single_rows(llama_teacher, spec):
    student = mmdistill.seed(llama_teacher, attention_layers=spec)
    ids = torch.randint(0, 101, (3, 17), generator=torch.Generator().manual_seed(1))
    check_cached_generation(student, ids, 9, left_pad=[0, 4, 8], chunk_size=3)


def test_sampling_is_seeded_and_respects_eos(llama_teacher):
    student = mmdistill.seed(llama_teacher)
    prompt = torch.randint(0, 101, (3, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(
        max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=[]
    )
    one = mmdistill.generate(student, prompt, generator=torch.Generator().manual_seed(7), **kw)
    two = mmdistill.generate(student, prompt, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(one, two)
    greedy = mmdistill.generate(student, prompt, max_new_tokens=10, eos_token_id=[])
    first = int(greedy[0, 5])
    stopped = mmdistill.generate(student, prompt[:1], max_new_tokens=10, eos_token_id=first)
    assert stopped.shape[1] == 6


def test_save_load_round_trip(tmp_path, llama_teacher, llama_dir):
    student = mmdistill.seed(
        llama_teacher, attention_layers="every:2", mixer={"gate_order": "after_norm"}
    )
    student.save_pretrained(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["layer_types"] == ["attention", "mamba", "attention", "mamba"]
    assert cfg["mixer"]["gate_order"] == "after_norm"
    assert cfg["teacher"]["config"]["architectures"] == ["LlamaForCausalLM"]
    assert len(cfg["teacher"]["weights_sha256"]["model.safetensors"]) == 64
    loaded = mmdistill.load_student(tmp_path / "s")
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)
    with pytest.raises(CheckpointError, match="not empty"):
        student.save_pretrained(tmp_path / "s")
    student.save_pretrained(tmp_path / "s", overwrite=True)
    # Sharded writes load the same.
    student.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(
            mmdistill.load_student(tmp_path / "sharded")(ids).logits, student(ids).logits
        )
    (tmp_path / "sharded" / "model-00002-of-00012.safetensors").unlink(missing_ok=True)
    shard = sorted((tmp_path / "sharded").glob("model-0*"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="partial"):
        mmdistill.load_student(tmp_path / "sharded")
    with pytest.raises(CheckpointError, match="not an mmdistill"):
        mmdistill.load_student(llama_dir)


def test_failed_save_leaves_nothing(tmp_path, llama_teacher, monkeypatch):
    import mmdistill.files as files_module

    student = mmdistill.seed(llama_teacher)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module, "save_file", boom)
    with pytest.raises(ResourceError, match="disk full"):
        student.save_pretrained(tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_seed_errors(llama_teacher):
    with pytest.raises(MmdistillError, match="out of range"):
        mmdistill.seed(llama_teacher, attention_layers="0,9")
    with pytest.raises(MmdistillError, match="d_state"):
        mmdistill.seed(llama_teacher, mixer={"d_state": 4})
    with pytest.raises(MmdistillError, match="num_heads"):
        mmdistill.seed(llama_teacher, mixer={"num_heads": 3})
    student = mmdistill.seed(llama_teacher)
    with pytest.raises(MmdistillError, match="already has Mamba"):
        mmdistill.seed(student)


def test_parameter_count_of_new_ssm_parameters(llama_teacher):
    from mmdistill.seeding import count_parameters

    student = mmdistill.seed(llama_teacher, attention_layers="every:2")
    # Per converted layer (hidden 48, 6 heads, 2 KV heads, head_dim 8): z 48x48, dt 6x48,
    # dt_bias 6, A_log 6, the conv over x (2x8), B (2x8) and C (6x8) channels with kernel 2 plus
    # bias, and the gate norm 48.
    conv_dim = 2 * 8 + 2 * 8 + 6 * 8
    per_layer = 48 * 48 + 6 * 48 + 6 + 6 + conv_dim * 2 + conv_dim + 48
    counts = count_parameters(student)
    assert counts["new"] == 2 * per_layer
    assert counts["total"] == sum(p.numel() for p in student.parameters())
