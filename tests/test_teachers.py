"""Teacher adapters against transformers' own forward, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import write_hf_model
from generation_harness import check_cached_generation
from safetensors.torch import load_file, save_file

from mmdistill import load_teacher
from mmdistill.cli import main
from mmdistill.errors import CheckpointError, TeacherError
from mmdistill.teachers.hf import split_grouped_wqkv


def compare_logits(hf_model, teacher, length=37):
    ids = torch.randint(0, 101, (2, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        ref, ours = hf_model(ids).logits, teacher(ids).logits
        ref_m, ours_m = (
            hf_model(ids, attention_mask=mask).logits,
            teacher(ids, attention_mask=mask).logits,
        )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_m[0, 6:], ref_m[0, 6:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_m[1], ref_m[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 6}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("qwen2", {}),
        ("mistral", {"sliding_window": 16}),
        ("qwen3", {"head_dim": 16}),
        ("qwen3", {"attention_bias": True, "use_sliding_window": True, "sliding_window": 8}),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
        ("phi3", {"pad_token_id": 0, "eos_token_id": 2}),
        ("phi3", {"pad_token_id": 0, "eos_token_id": 2, "sliding_window": 16}),
    ],
)
def test_hf_teacher_matches_transformers(tmp_path, family, overrides):
    hf_model = write_hf_model(tmp_path, family, **overrides)
    teacher = load_teacher(str(tmp_path))
    assert teacher.config.teacher["adapter"] == family
    assert all(not p.requires_grad for p in teacher.parameters())
    compare_logits(hf_model, teacher)
    # cached inference (past Mistral's 16-token window too), plain and left-padded
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(4))
    check_cached_generation(teacher, ids, 20, chunk_size=8)
    check_cached_generation(teacher, ids, 20, left_pad=[6, 0], max_length=48)


QWEN2_WINDOWS = {
    "no layer": (4, ["full_attention"] * 4),
    "some layers": (2, ["full_attention"] * 2 + ["sliding_attention"] * 2),
    "every layer": (0, ["sliding_attention"] * 4),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["layer_types", "max_window_layers"])
@pytest.mark.parametrize("case", list(QWEN2_WINDOWS))
def test_qwen2_sliding_windows_match_transformers(tmp_path, case, legacy):
    """Qwen2 windows only layers ``max_window_layers`` and above (``layer_types`` when the
    config has it): the teacher, and the students seeded from it, against transformers on
    sequences past the 8-token window."""
    from mmdistill.seeding import seed

    first, types = QWEN2_WINDOWS[case]
    hf_model = write_hf_model(
        tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=first
    )
    assert hf_model.config.layer_types == types
    if legacy:  # a config.json written before transformers added layer_types
        cfg = json.loads((tmp_path / "config.json").read_text())
        del cfg["layer_types"]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    teacher = load_teacher(str(tmp_path))
    windows = [s.sliding_window for s in teacher.config.stacks for _ in range(s.num_layers)]
    assert windows == [8 if t == "sliding_attention" else None for t in types]
    assert teacher.config.teacher["verified"]["layers"] == sorted({0, 1, types.index(types[-1])})
    compare_logits(hf_model, teacher)
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(4))
    for layout in ("every:2", "none"):
        student = seed(teacher, layout)
        check_cached_generation(student, ids, 20, chunk_size=8)
        check_cached_generation(student, ids, 20, left_pad=[6, 0], max_length=48)


GEMMA = dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=8)
MIXED = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("gemma2", {"attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.5}),
        ("gemma2", {"layer_types": MIXED}),
        ("gemma3", {"layer_types": MIXED}),
        (
            "gemma3",
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                }
            },
        ),
    ],
)
def test_gemma_teachers_and_their_students_match_transformers(tmp_path, family, overrides):
    """Gemma 2 / 3 (text): teacher logits against transformers past the 8-token window; the
    seeded hybrid and linear students generate with the cache as they recompute."""
    from mmdistill.seeding import seed

    hf_model = write_hf_model(tmp_path, family, **{**GEMMA, **overrides})
    teacher = load_teacher(str(tmp_path))
    assert teacher.config.teacher["adapter"] == family
    compare_logits(hf_model, teacher)
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(4))
    check_cached_generation(teacher, ids, 20, chunk_size=8)
    for layout in ("every:2", "none"):
        student = seed(teacher, layout)
        check_cached_generation(student, ids, 20, chunk_size=8)
        check_cached_generation(student, ids, 20, left_pad=[6, 0], max_length=48)


def test_qwen3_students_carry_the_query_and_key_norms_into_c_and_b(tmp_path):
    from mmdistill.seeding import seed

    write_hf_model(tmp_path, "qwen3", head_dim=16)
    teacher = load_teacher(str(tmp_path))
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(4))
    for layout in ("every:2", "none"):
        student = seed(teacher, layout)
        for layer in student.mixer_layers():
            attn, mixer = teacher.layers[layer].mixer, student.layers[layer].mixer
            assert mixer.config.bc_norm and mixer.config.d_state == 16
            assert torch.equal(mixer.c_norm_weight, attn.q_norm.weight)
            assert torch.equal(mixer.b_norm_weight, attn.k_norm.weight)
        check_cached_generation(student, ids, 20, chunk_size=8)
        check_cached_generation(student, ids, 20, left_pad=[6, 0], max_length=48)


def test_phi4_mini_partial_rotary_is_refused(tmp_path):
    write_hf_model(tmp_path, "phi3", pad_token_id=0, eos_token_id=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["partial_rotary_factor"] = 0.75
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherError, match="RoPE on part of each head"):
        load_teacher(str(tmp_path))


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.3, 1.9, 2.5],
    "long_factor": [1.1, 2.0, 3.5, 6.0],
    "original_max_position_embeddings": 16,
}


@pytest.mark.parametrize(
    "family,rope,extra",
    [
        ("llama", YARN, {}),
        ("llama", {**YARN, "beta_fast": 8, "beta_slow": 2, "attention_factor": 1.2}, {}),
        ("qwen2", YARN, {}),
        (
            "phi3",
            LONGROPE,
            dict(pad_token_id=0, eos_token_id=2, max_position_embeddings=64)
            | {"original_max_position_embeddings": 16},  # Phi-3's top-level field wins
        ),
    ],
    ids=["llama-yarn", "llama-yarn-custom", "qwen2-yarn", "phi3-longrope"],
)
def test_stretched_rope_matches_transformers(tmp_path, family, rope, extra):
    """YaRN and LongRoPE (its short factors below 16 positions, long ones past them)."""
    hf_model = write_hf_model(
        tmp_path, family, rope_parameters={"rope_theta": 1e4, **rope}, **extra
    )
    teacher = load_teacher(str(tmp_path))
    compare_logits(hf_model, teacher)
    compare_logits(hf_model, teacher, length=12)
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(4))
    # LongRoPE picks its factors per call: a prompt prefilled in chunks that start below the
    # switch keeps short-factor keys (as in transformers), so prefill it in one call here.
    check_cached_generation(teacher, ids, 20, chunk_size=None if rope is LONGROPE else 8)


def test_a_planted_adapter_bug_is_caught_at_seed_naming_the_layer(tmp_path, monkeypatch, capfd):
    """Keys and values swapped by the adapter: shapes agree, transformers' forward does not."""
    from mmdistill.teachers import hf
    from mmdistill.teachers.base import Rule

    write_hf_model(tmp_path / "teacher", "llama")
    swapped = [
        Rule(hf.LAYER + r"self_attn\.k_proj\.weight", "layers.{0}.mixer.v_proj.weight"),
        Rule(hf.LAYER + r"self_attn\.v_proj\.weight", "layers.{0}.mixer.k_proj.weight"),
        *hf.LLAMA_RULES,
    ]
    monkeypatch.setattr(hf, "LLAMA_RULES", swapped)
    with pytest.raises(TeacherError, match=r"LlamaForCausalLM at layer 0 .*--no-verify"):
        load_teacher(str(tmp_path / "teacher"))
    out = tmp_path / "student"
    argv = ["mmdistill", "seed", "--teacher", str(tmp_path / "teacher"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2 and not out.exists()
    assert "at layer 0" in " ".join(capfd.readouterr().err.split())
    monkeypatch.setattr(sys, "argv", [*argv, "--no-verify"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code in (0, None)
    student = json.loads((out / "config.json").read_text())
    assert student["teacher"]["verified"] == {"skipped": "verification turned off"}


def test_a_misread_window_is_caught_before_any_weight_is_compared(tmp_path, monkeypatch):
    from mmdistill.teachers import hf

    write_hf_model(
        tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2
    )
    backwards = lambda self, cfg: hf.lm_from_hf(  # noqa: E731 - every layer windowed
        cfg, hf.stack_from_hf(cfg, qkv_bias=True, sliding_window=cfg["sliding_window"])
    )
    monkeypatch.setattr(hf.Qwen2Adapter, "lm_config", backwards)
    with pytest.raises(TeacherError, match="layer 0 a sliding window of 8.*gives it None"):
        load_teacher(str(tmp_path))


def test_remote_code_teachers_record_why_they_were_not_verified(hovle):
    assert hovle.config.teacher["verified"] == {
        "skipped": "transformers has no class for InternVLChatModel"
    }


def pack_grouped_wqkv(q, k, v, heads, kv_heads, head_dim):
    """Test-side packing, written as an explicit loop: for each KV head its queries, k, v."""
    group = heads // kv_heads
    rows = []
    for j in range(kv_heads):
        for i in range(group):
            rows.append(q[(j * group + i) * head_dim : (j * group + i + 1) * head_dim])
        rows.append(k[j * head_dim : (j + 1) * head_dim])
        rows.append(v[j * head_dim : (j + 1) * head_dim])
    return torch.cat(rows)


def llama_to_internlm2(src, dst):
    """Rewrite a Llama checkpoint in InternLM2's key layout with grouped wqkv."""
    cfg = json.loads((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // heads
    out = {
        "model.tok_embeddings.weight": tensors["model.embed_tokens.weight"],
        "model.norm.weight": tensors["model.norm.weight"],
        "output.weight": tensors["lm_head.weight"],
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "attention.wqkv.weight"] = pack_grouped_wqkv(
            tensors[p + "self_attn.q_proj.weight"],
            tensors[p + "self_attn.k_proj.weight"],
            tensors[p + "self_attn.v_proj.weight"],
            heads,
            kv,
            hd,
        )
        out[p + "attention.wo.weight"] = tensors[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = tensors[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = tensors[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = tensors[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = tensors[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = tensors[p + "post_attention_layernorm.weight"]
    dst.mkdir(exist_ok=True)
    save_file(out, str(dst / "model.safetensors"))
    new_cfg = {
        k: cfg[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "hidden_act",
        )
    }
    new_cfg.update(
        architectures=["InternLM2ForCausalLM"],
        model_type="internlm2",
        bias=False,
        rope_theta=cfg.get("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta")),
        tie_word_embeddings=False,
    )
    (dst / "config.json").write_text(json.dumps(new_cfg))


def test_internlm2_grouped_wqkv_matches_llama(tmp_path):
    hf_model = write_hf_model(
        tmp_path / "llama", "llama", num_attention_heads=6, num_key_value_heads=2
    )
    llama_to_internlm2(tmp_path / "llama", tmp_path / "internlm2")
    teacher = load_teacher(str(tmp_path / "internlm2"))
    assert teacher.config.teacher["adapter"] == "internlm2"
    compare_logits(hf_model, teacher)


def test_split_grouped_wqkv_identifiable_rows():
    heads, kv, hd = 6, 2, 3
    group = heads // kv
    # Row r of the fused matrix holds the value r everywhere: we can read where each row went.
    fused = torch.arange(kv * (group + 2) * hd, dtype=torch.float32)[:, None].repeat(1, 5)
    q, k, v = split_grouped_wqkv(fused, heads, kv, hd)
    for head in range(heads):
        j, i = divmod(head, group)
        start = j * (group + 2) * hd + i * hd
        assert torch.equal(
            q[head * hd : (head + 1) * hd, 0], torch.arange(start, start + hd).float()
        )
    for j in range(kv):
        kstart = j * (group + 2) * hd + group * hd
        assert torch.equal(k[j * hd : (j + 1) * hd, 0], torch.arange(kstart, kstart + hd).float())
        assert torch.equal(
            v[j * hd : (j + 1) * hd, 0], torch.arange(kstart + hd, kstart + 2 * hd).float()
        )
    qb, kb, vb = split_grouped_wqkv(fused[:, 0], heads, kv, hd)  # biases split the same way
    assert torch.equal(qb, q[:, 0]) and torch.equal(kb, k[:, 0]) and torch.equal(vb, v[:, 0])


@pytest.mark.parametrize(
    "architectures,message",
    [
        (["GPTNeoXForCausalLM"], "not supported: attention and MLP run in parallel"),
        (["Qwen2_5_VLForConditionalGeneration"], "not supported: M-RoPE"),
        (["MysteryForCausalLM"], r"MysteryForCausalLM is not supported\. Supported: llama"),
        (None, "names no 'architectures' \\(model_type 'llama'\\).*LlamaForCausalLM"),
    ],
)
def test_unsupported_architectures_are_refused_saying_why(
    tmp_path, llama_dir, architectures, message
):
    cfg = json.loads((llama_dir / "config.json").read_text())
    if architectures is None:
        del cfg["architectures"]
    else:
        cfg["architectures"] = architectures
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes())
    with pytest.raises(TeacherError, match=message) as refused:
        load_teacher(str(tmp_path))
    assert "register_adapter (docs/adapters.md)" in str(refused.value)


def test_partial_and_unreadable_weights(tmp_path, llama_dir):
    cfg = (llama_dir / "config.json").read_text()
    tensors = load_file(str(llama_dir / "model.safetensors"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text(cfg)
    save_file(
        {k: v for k, v in tensors.items() if "layers.3." not in k},
        str(partial / "model.safetensors"),
    )
    with pytest.raises(TeacherError, match="missing or partial"):
        load_teacher(str(partial))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text(cfg)
    save_file({**tensors, "model.mystery.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(TeacherError, match="not understood.*model.mystery.weight"):
        load_teacher(str(extra))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(cfg)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_teacher(str(broken))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(cfg)
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_teacher(str(pickled))


def test_offline_hub_source_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(TeacherError, match="local"):
        load_teacher("hovle")
    with pytest.raises(TeacherError, match="not a local directory"):
        load_teacher("./no/such/dir")
    assert time.monotonic() - start < 10


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "teachers").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TeacherError, match="teachers/typo does not exist .its folder teachers"):
        load_teacher("teachers/typo")


def test_gguf_source_is_converted_once(tmp_path, monkeypatch):
    """A .gguf source goes through transformers' GGUF reader into a cached safetensors folder.

    The GGUF file is written here from a tiny random Llama with the gguf package (when
    installed), so the test needs no download.
    """
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from mmdistill.teachers.loading import resolve_source

    src = tmp_path / "llama"
    hf_model = write_hf_model(src, "llama", vocab_size=128)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    cfg = hf_model.config
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w, n_head):  # llama.cpp stores Q/K rows interleaved for its RoPE
        return (
            w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    for key, value in hf_model.state_dict().items():
        t = value.float().numpy()
        if key in names:
            writer.add_tensor(names[key], t)
            continue
        i, rest = key.split(".")[2], ".".join(key.split(".")[3:])
        module, kind = rest.rsplit(".", 1)
        if module == "self_attn.q_proj":
            t = permute(t, heads)
        elif module == "self_attn.k_proj":
            t = permute(t, kv)
        writer.add_tensor(f"blk.{i}.{per_layer[module]}.{kind}", t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    monkeypatch.setenv("MMDISTILL_CACHE", str(tmp_path / "cache"))
    try:
        reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    except Exception as exc:  # transformers' GGUF reader rejects hand-written metadata
        pytest.skip(f"transformers cannot read the hand-written GGUF: {exc}")
    teacher = load_teacher(str(path))
    folder = resolve_source(str(path))
    assert (folder / "model.safetensors").exists() and folder.is_relative_to(tmp_path / "cache")
    ids = torch.randint(0, 128, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
