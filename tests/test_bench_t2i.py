"""``mmdistill bench --task t2i`` on CPU with tiny models and 2x2-code images: the document, the
batch search's stopping rules, LoRA merged or kept, and the command line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from mmdistill import bench, bench_t2i
from mmdistill.cli import app
from mmdistill.seeding import seed

TINY = dict(grid=2, codebook_size=32, embed_dim=16, caption_tokens=3, probe_steps=1)


@pytest.fixture(scope="module")
def teacher():
    return bench.random_model("tiny", "cpu", torch.float32, seed=0)


@pytest.fixture(scope="module")
def candidates(teacher):
    settings = bench_t2i.T2ISettings(lengths=[16], **TINY)
    students = [("linear", seed(teacher, "none")), ("hybrid", seed(teacher, "every:2"))]
    options = bench.RowOptions(linear_chunk=8)
    return bench_t2i.t2i_candidates(teacher, students, settings, options)


def test_t2i_document(candidates):
    settings = bench_t2i.T2ISettings(lengths=[16], max_batch=2, min_gain=-1.0, **TINY)
    doc = bench_t2i.run_t2i_bench(candidates, settings, "cpu")
    json.dumps(doc)
    assert doc["schema"] == bench_t2i.SCHEMA and doc["task"] == "t2i"
    assert [(m["name"], m["lora"], m["kv_cache"]) for m in doc["models"]] == [
        ("attention", None, "static"),
        ("linear", "merged", "none"),
        ("hybrid", "merged", "static"),
    ]
    assert [(s["probed"], s["stopped_by"]) for s in doc["searches"]] == [([1, 2], "max_batch")] * 3
    full = [r for r in doc["results"] if r["kind"] == "full"]
    for row in full:
        assert row["status"] == "ok" and row["steps_timed"] == 3  # 4 codes: 1 + 3 steps
        total = row["prefill_ms"] + row["replicate_ms"] + row["decode_ms"]
        assert row["images_per_s"] == pytest.approx(row["batch"] / total * 1e3)
    for name in ("attention", "linear", "hybrid"):
        best = next(s["best_batch"] for s in doc["searches"] if s["model"] == name)
        assert sorted(r["batch"] for r in full if r["model"] == name) == sorted({1, best})
    assert {(r["student"], r["at"]) for r in doc["ratios"]} == {
        (s, at) for s in ("linear", "hybrid") for at in ("batch 1", "best")
    }


def test_batch_search_stops_at_no_gain_or_out_of_memory(candidates, monkeypatch):
    rates = {1: 1.0, 2: 1.9, 4: 3.0, 8: 3.1, 16: 9.0}

    def fake_probe(candidate, length, batch, prefilled, settings, device):
        if batch > settings.max_batch // 2 and settings.max_batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return {
            "model": candidate.name,
            "batch": batch,
            "status": "ok",
            "images_per_s": rates[batch],
        }

    monkeypatch.setattr(bench_t2i, "probe", fake_probe)
    linear, cpu = candidates[1], torch.device("cpu")
    settings = bench_t2i.T2ISettings(lengths=[16], max_batch=16, **TINY)
    rows, summary = bench_t2i.search_batches(linear, 16, settings, cpu)
    assert (summary["probed"], summary["best_batch"], summary["stopped_by"]) == (
        [1, 2, 4, 8],
        8,
        "gain",
    )
    settings.max_batch = 32
    settings.min_gain = 0.0
    rows, summary = bench_t2i.search_batches(linear, 16, settings, cpu)
    assert summary["probed"] == [1, 2, 4, 8, 16, 32] and summary["stopped_by"] == "oom"
    assert rows[-1]["status"] == "oom" and "1 TiB" in rows[-1]["error"]
    assert summary["best_batch"] == 16


def test_students_keep_or_merge_their_t2i_adapter(teacher):
    kept = bench_t2i.T2ISettings(lengths=[16], lora="adapters", **TINY)
    student = bench_t2i.t2i_model(seed(teacher, "none"), kept, adapters=True)
    assert student.config.lora is not None and student.image_vocab.spec.grid == 2
    bf16 = bench_t2i.t2i_model(copy.deepcopy(teacher).to(torch.bfloat16), kept, adapters=False)
    assert {r.inv_freq.dtype for r in bf16.rotary} == {torch.float32}
    merged = bench_t2i.t2i_model(student, bench_t2i.T2ISettings(lengths=[16], **TINY), True)
    assert merged.config.lora is None and merged.config.teacher["merged_task"] == "t2i"
    with pytest.raises(ValueError, match="lora must be one of"):
        bench_t2i.T2ISettings(lengths=[16], lora="folded")


def test_cli_t2i_json_and_text_only_options():
    args = ["bench", "--task", "t2i", "--random-shape", "tiny", "--seed-layout", "none"]
    args += ["--lengths", "8", "--grid", "2", "--codebook", "32", "--max-batch", "1"]
    args += ["--device", "cpu", "--dtype", "float32"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [m["name"] for m in doc["models"]] == ["attention", "linear"]
    assert doc["teacher"] == "random:tiny" and doc["ratios"][0]["student"] == "linear"
    refused = CliRunner().invoke(app, [*args, "--batch", "4"])
    assert refused.exit_code == 2 and "text only" in refused.output
