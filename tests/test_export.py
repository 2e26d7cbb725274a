"""Serving export: students written as stock ``GraniteMoeHybridForCausalLM`` folders.

Exact means stock transformers (its own class, loaded with ``AutoModelForCausalLM``) gives the
student's logits on random ids (<= 1e-4 of their scale, fp32) and stock ``generate()`` gives the
student's greedy tokens; every mixer parameter is randomised first so that a mapping mistake
cannot hide behind seeding's zeros and ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_omni_student, run_cli, write_hf_model
from safetensors import safe_open
from test_teachers import llama_to_internlm2

import mmdistill
from mmdistill.errors import CheckpointError
from mmdistill.export import ExportError, check_export, export_student, load_export

FAMILIES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "smollm2": ("llama", {"tie_word_embeddings": True}),  # SmolLM2 is a tied Llama
    "internlm2": ("internlm2", {}),
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-teachers")
    out = {}
    for name, (family, overrides) in FAMILIES.items():
        if family == "internlm2":
            write_hf_model(root / "llama-for-internlm2", "llama", seed=3)
            llama_to_internlm2(root / "llama-for-internlm2", root / name)
        else:
            write_hf_model(root / name, family, seed=len(out), **overrides)
        out[name] = mmdistill.load_teacher(str(root / name), verify=False)
    return out


def randomised_student(teacher, layout: str, **mixer) -> mmdistill.DecoderLM:
    student = mmdistill.seed(teacher, attention_layers=layout, mixer={"use_D": True, **mixer})
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".mixer." in name and any(k in name for k in ("dt_", "z_proj", "D", "norm", "conv")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        student.norm.weight.mul_(30.0)  # peaked logits: greedy choices are not near-ties
    return student


@pytest.mark.parametrize("layout", ["none", "every:2", "all"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_stock_transformers_runs_the_export_exactly(teachers, tmp_path, family, layout):
    student_dir, out = tmp_path / "student", tmp_path / "export"
    randomised_student(teachers[family], layout, conv_kernel=4).save_pretrained(student_dir)
    report = export_student(student_dir, out)
    assert report["architecture"] == "GraniteMoeHybridForCausalLM"
    result = check_export(str(out), str(student_dir))
    assert result["relative_diff"] <= 1e-4, result
    assert result["tokens_equal"], result
    # pure-Mamba exports generate without the cache (transformers 5.24 cannot keep one)
    assert result["use_cache"] == (layout != "none")


def test_key_names_and_config_fields_are_the_transformers_class_own(teachers, tmp_path):
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    student_dir, out = tmp_path / "student", tmp_path / "export"
    randomised_student(teachers["qwen2"], "every:2").save_pretrained(student_dir)
    export_student(student_dir, out)
    document = json.loads((out / "config.json").read_text())
    config = GraniteMoeHybridConfig.from_pretrained(str(out))
    assert document["architectures"] == ["GraniteMoeHybridForCausalLM"]
    assert document["layer_types"] == ["attention", "mamba", "attention", "mamba"]
    assert config.num_local_experts == 0 and config.position_embedding_type == "rope"
    assert config.mamba_n_heads == config.mamba_n_groups == config.num_attention_heads
    assert "mmdistill" in document and document["mmdistill"]["teacher"]
    with torch.device("meta"):
        expected = GraniteMoeHybridForCausalLM(config).state_dict()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert written == {k: tuple(v.shape) for k, v in expected.items()}
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: transformers")


def test_a_bf16_export_holds_the_rounded_weights(teachers, tmp_path):
    student_dir, out = tmp_path / "student", tmp_path / "export"
    randomised_student(teachers["llama"], "every:2").save_pretrained(student_dir)
    assert export_student(student_dir, out, dtype="bfloat16")["dtype"] == "bfloat16"
    result = check_export(str(out), str(student_dir))
    assert result["passed"], result


def _planted(teachers, tmp_path, case):
    """A student of each non-exportable kind, saved; and the words its refusal must contain."""
    if case == "gate after norm":
        student = mmdistill.seed(teachers["llama"], "none", mixer={"gate_order": "after_norm"})
        words = "gate after the norm"
    elif case == "sliding window":
        write_hf_model(tmp_path / "windowed", "mistral", sliding_window=8)
        student = mmdistill.seed(mmdistill.load_teacher(str(tmp_path / "windowed")), "every:2")
        words = "sliding-window attention"
    elif case == "qk norm":
        write_hf_model(tmp_path / "qwen3", "qwen3")
        student = mmdistill.seed(mmdistill.load_teacher(str(tmp_path / "qwen3")), "every:2")
        words = "query/key norms"
    elif case == "gemma 2":
        write_hf_model(tmp_path / "gemma2", "gemma2")
        student = mmdistill.seed(mmdistill.load_teacher(str(tmp_path / "gemma2")), "every:2")
        words = "soft-capped"
    else:
        student = make_omni_student(teachers["llama"])
        words = "an image vocabulary"
    student.save_pretrained(tmp_path / "student")
    return tmp_path / "student", words


@pytest.mark.parametrize(
    "case", ["gate after norm", "sliding window", "qk norm", "gemma 2", "image vocabulary"]
)
def test_what_cannot_be_exported_is_refused_before_anything_is_written(teachers, tmp_path, case):
    student_dir, words = _planted(teachers, tmp_path, case)
    with pytest.raises(ExportError, match=words):
        export_student(student_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_a_vision_student_is_refused_and_says_why(hovle, tmp_path):
    mmdistill.seed(hovle, "every:2").save_pretrained(tmp_path / "student")
    with pytest.raises(ExportError, match="a vision front-end .* takes token ids only"):
        export_student(tmp_path / "student", tmp_path / "export")


cli = run_cli


def test_cli_export_check_json_force_and_a_failing_check(teachers, tmp_path, monkeypatch, capfd):
    student_dir, out = tmp_path / "student", tmp_path / "export"
    randomised_student(teachers["qwen2"], "every:2").save_pretrained(student_dir)
    args = ["export", "--student", str(student_dir), "--out", str(out)]
    code, stdout, _ = cli(monkeypatch, capfd, *args, "--check", "--json")
    report = json.loads(stdout)
    assert code == 0 and report["status"] == "ok" and report["check"]["passed"]
    code, _, err = cli(monkeypatch, capfd, *args)
    assert code == 2 and "is not empty (use --force" in err
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(monkeypatch, capfd, *args, "--force")
    assert code == 2 and "files mmdistill did not write (notes.txt)" in err
    (out / "notes.txt").unlink()

    import mmdistill.export.hf_folder as hf_folder

    real = hf_folder.granite_state_dict

    def planted(config, sd):  # a mapping bug: one Mamba head's gate weights swapped
        state = real(config, sd)
        w = state["model.layers.1.mamba.in_proj.weight"]
        w[:8] = w[:8].flip(0).clone()
        return state

    monkeypatch.setattr(hf_folder, "granite_state_dict", planted)
    code, stdout, err = cli(monkeypatch, capfd, *args, "--force", "--check", "--json")
    report = json.loads(stdout)
    assert code == 4 and report["status"] == "check_failed"
    assert report["check"]["relative_diff"] > 1e-4 and "export check failed" in err


def test_seed_says_whether_the_student_will_export(teachers, tmp_path, monkeypatch, capfd):
    teacher = Path(teachers["llama"].config.teacher["directory"])
    base = ["seed", "--teacher", str(teacher), "--no-verify", "--json"]
    code, stdout, err = cli(monkeypatch, capfd, *base, "--out", str(tmp_path / "a"))
    assert code == 0 and json.loads(stdout)["export"]["exportable"] is True
    assert "exportable to GraniteMoeHybridForCausalLM" in err
    after = [*base, "--out", str(tmp_path / "b"), "--gate-order", "after_norm"]
    code, stdout, err = cli(monkeypatch, capfd, *after)
    verdict = json.loads(stdout)["export"]
    assert code == 0 and verdict["exportable"] is False
    assert "seed with --gate-order before_norm" in verdict["reasons"][0]


def test_a_transformers_release_that_runs_the_export_wrongly_is_refused(
    teachers, tmp_path, monkeypatch, capfd
):
    """transformers 5.17 loads an export and computes wrong logits (0.98 of their scale, run on
    the CPU and on an H200): --check refuses it before writing, load_export refuses it."""
    import transformers

    student_dir, out = tmp_path / "student", tmp_path / "export"
    randomised_student(teachers["llama"], "none").save_pretrained(student_dir)
    export_student(student_dir, out)
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(ExportError, match="transformers 5.17.0 normalises .* per group"):
        load_export(out)
    args = ["export", "--student", str(student_dir), "--out", str(tmp_path / "new"), "--check"]
    code, _, err = cli(monkeypatch, capfd, *args)
    assert code == 2 and "hint: pip install -U 'transformers>=5.23.0'" in err
    assert not (tmp_path / "new").exists()


def test_force_does_not_replace_a_student(teachers, tmp_path):
    randomised_student(teachers["llama"], "none").save_pretrained(tmp_path / "student")
    mmdistill.seed(teachers["llama"], "none").save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="holds no mmdistill export"):
        export_student(tmp_path / "student", tmp_path / "other", force=True)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["none", "every:2"])
def test_a_bf16_export_runs_under_stock_transformers_on_cuda(teachers, tmp_path, layout):
    """bf16 on the GPU: stock transformers on the export against our student (its Triton kernels
    where present), each measured against our float32 logits: stock's bf16 error may be at most
    twice ours (bf16 rounds differently in each; a mapping error is far larger). Greedy tokens
    with each side's cache must agree; the logits are made peaked so that greedy choices are not
    near-ties that bf16 rounding could flip."""
    student = randomised_student(teachers["qwen2"], layout)
    student.save_pretrained(tmp_path / "student")
    export_student(tmp_path / "student", tmp_path / "export", dtype="bfloat16")
    ours = mmdistill.load_student(tmp_path / "student", dtype=torch.bfloat16, device="cuda")
    exact = mmdistill.load_student(tmp_path / "student", dtype=torch.float32, device="cuda")
    exact.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    stock = load_export(tmp_path / "export", dtype=torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 96), generator=g).cuda()
    with torch.no_grad():
        reference = exact(ids).logits
        our_error = (ours(ids).logits.float() - reference).abs().max().item()
        stock_error = (stock(ids, use_cache=False).logits.float() - reference).abs().max().item()
    assert stock_error <= 2 * our_error + 1e-3 * reference.abs().max().item()
    prompt = ids[:1, :40]
    mine = mmdistill.generate(ours, prompt, max_new_tokens=12)
    theirs = stock.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        use_cache=bool(stock.config.use_cache),
        pad_token_id=0,
    )
    assert torch.equal(mine, theirs)
