"""docs/adapters.md's worked example runs as written: its python blocks define and register a
Phi-3 adapter and a check against transformers, run here on tiny random Phi-3 checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_hf_kwargs
from safetensors.torch import load_file, save_file

from mmdistill import load_teacher
from mmdistill.errors import TeacherError
from mmdistill.teachers import base

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"


def doc_python_blocks() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 2, "docs/adapters.md lost its worked example"
    return blocks


@pytest.fixture
def doc_namespace(monkeypatch):
    """The doc's blocks run in one namespace, registering into a throw-away adapter list
    without the built-in Phi-3 adapter, so that Phi-3 checkpoints reach the doc's adapter."""
    monkeypatch.setattr(base, "ADAPTERS", [a for a in base.ADAPTERS if a.name != "phi3"])
    namespace: dict = {"__name__": "adapters_doc"}
    for block in doc_python_blocks():
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def write_phi3(directory: Path, **overrides):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(
        **tiny_hf_kwargs(pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    )
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so a swapped norm cannot hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(directory))
    return model


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 16}])
def test_doc_adapter_matches_transformers(tmp_path, doc_namespace, overrides):
    hf_model = write_phi3(tmp_path, **overrides)
    config = {"architectures": ["Phi3ForCausalLM"]}
    assert isinstance(base.find_adapter(config, "doc"), doc_namespace["Phi3Adapter"])
    assert doc_namespace["check_against_transformers"](tmp_path) <= 1e-5
    # The same comparison written here, independent of the doc's check function.
    teacher = load_teacher(str(tmp_path))
    assert teacher.config.teacher["adapter"] == "phi3"
    assert teacher.config.stacks[0].sliding_window == overrides.get("sliding_window")
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, hf_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_doc_adapter_refuses_extra_missing_and_partial_rotary(tmp_path, doc_namespace):
    write_phi3(tmp_path / "phi3")
    config = (tmp_path / "phi3" / "config.json").read_text()
    tensors = load_file(str(tmp_path / "phi3" / "model.safetensors"))
    for name, weights in (
        ("extra", {**tensors, "model.layers.0.self_attn.qkv_proj.bias": torch.zeros(3)}),
        ("missing", {k: v for k, v in tensors.items() if "layers.2.mlp" not in k}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        save_file(weights, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(TeacherError, match="not understood.*qkv_proj.bias"):
        load_teacher(str(tmp_path / "extra"))
    with pytest.raises(TeacherError, match="missing or partial.*layers.2.mlp"):
        load_teacher(str(tmp_path / "missing"))
    partial = tmp_path / "partial"
    write_phi3(partial, partial_rotary_factor=0.5)
    with pytest.raises(TeacherError, match="partial_rotary_factor 0.5"):
        load_teacher(str(partial))
