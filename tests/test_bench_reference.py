"""The bench's transformers rows: the teacher's own class loaded from its folder (same logits
as our conversion), a Llama of the same sizes for a random shape, none for a class transformers
lacks; the rows run with growing and static caches and enter the ratios."""

from __future__ import annotations

import json

import torch
from conftest import run_cli

import mmdistill
from mmdistill.bench import BenchSettings, RowOptions, candidates_for, random_model, run_bench
from mmdistill.bench_reference import reference_model


def test_a_folder_teacher_runs_as_its_own_transformers_class(llama_teacher):
    reference = reference_model(llama_teacher, "cpu", torch.float32)
    assert type(reference).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, llama_teacher.config.vocab_size, (1, 20))
    with torch.no_grad():
        ours, theirs = llama_teacher(ids).logits, reference(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()


def test_random_shapes_get_a_llama_of_their_sizes_and_hovle_gets_none(hovle):
    teacher = random_model("tiny", "cpu", torch.float32)
    reference = reference_model(teacher, "cpu", torch.float32)
    assert reference.config.num_hidden_layers == teacher.config.num_layers
    assert reference.config.hidden_size == teacher.config.hidden_size
    assert reference_model(hovle, "cpu", torch.float32) is None  # no class in transformers


def test_the_rows_run_with_both_caches_and_enter_the_ratios(llama_teacher):
    student = mmdistill.seed(llama_teacher, attention_layers="none")
    reference = reference_model(llama_teacher, "cpu", torch.float32)
    rows = candidates_for(llama_teacher, [("linear", student)], RowOptions(), reference=reference)
    settings = BenchSettings(lengths=[16], decode_tokens=3, warmup=False)
    document = run_bench(rows, settings, "cpu")
    names = {r["model"]: r for r in document["results"]}
    for name in ("teacher (transformers)", "teacher (transformers, static KV)"):
        assert names[name]["status"] == "ok" and names[name]["decode_ms_per_token"] > 0
    compared = {(r["student"], r["teacher"]) for r in document["ratios"]}
    assert ("linear", "teacher (transformers)") in compared
    assert document["models"][2]["class"] == "LlamaForCausalLM"


def test_cli_rows_can_be_left_out(monkeypatch, capfd):
    args = ["bench", "--random-shape", "tiny", "--lengths", "16", "--decode-tokens", "2"]
    args += ["--device", "cpu", "--no-static-cache", "--json"]
    code, out, _ = run_cli(monkeypatch, capfd, *args)
    models = [m["name"] for m in json.loads(out)["models"]]
    assert code == 0 and models == ["teacher", "teacher (transformers)"]
    code, out, _ = run_cli(monkeypatch, capfd, *args, "--no-transformers-teacher")
    assert code == 0 and [m["name"] for m in json.loads(out)["models"]] == ["teacher"]
