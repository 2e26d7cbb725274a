"""``mmdistill bench`` on CPU at small lengths: the document's schema, ratios, OOM handling,
the plot and the command line."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from mmdistill import bench
from mmdistill.cached_forward import prefill
from mmdistill.cli import app, main
from mmdistill.model import LMCache
from mmdistill.seeding import seed
from mmdistill.shapes import HOVLE_2_6B, text_config

ROW_KEYS = {
    "model",
    "length",
    "batch",
    "prefill_batch",
    "status",
    "prefill_ms",
    "decode_ms_per_token",
    "decode_tokens_per_s",
    "peak_memory_bytes",
    "cache_bytes",
}


def test_parse_counts():
    assert bench.parse_counts("1k, 4k,103k,1m,1000") == [1024, 4096, 105472, 1048576, 1000]
    assert bench.human_count(105472) == "103k" and bench.human_count(1000) == "1000"
    assert bench.human_count(1048576) == "1m" and bench.parse_count("1m") == 1048576
    for bad in ("abc", "0", "-1k"):
        with pytest.raises(ValueError, match="count|least"):
            bench.parse_count(bad)


@pytest.fixture(scope="module")
def candidates():
    teacher = bench.random_model("tiny", "cpu", torch.float32, seed=0)
    return [
        bench.Candidate("teacher", "teacher", teacher, "growing"),
        bench.Candidate("teacher (static KV)", "teacher", teacher, "static"),
        bench.Candidate("linear", "student", seed(teacher, "none"), "none", prefill_chunk=16),
        bench.Candidate("hybrid", "student", seed(teacher, "every:2"), "growing", prefill_chunk=16),
    ]


def test_run_bench_document(candidates):
    settings = bench.BenchSettings(lengths=[16, 40], batches=[1], decode_tokens=1)
    doc = bench.run_bench(candidates, settings, "cpu")
    json.dumps(doc)  # serialisable
    assert doc["schema"] == bench.SCHEMA and doc["device"]["type"] == "cpu"
    assert [m["name"] for m in doc["models"]] == [c.name for c in candidates]
    assert doc["models"][3]["attention_layers"] == [0, 2]
    assert len(doc["results"]) == 4 * 2
    for row in doc["results"]:
        assert ROW_KEYS <= set(row) and row["status"] == "ok"
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["peak_memory_bytes"] is None  # CPU: wall clock, no GPU memory
    by = {(r["model"], r["length"], r["batch"]): r for r in doc["results"]}
    # The linear student's state does not grow with the context; the KV caches do.
    assert by[("linear", 16, 1)]["cache_bytes"] == by[("linear", 40, 1)]["cache_bytes"]
    assert by[("teacher", 40, 1)]["cache_bytes"] > by[("teacher", 16, 1)]["cache_bytes"]
    pairs = {(r["student"], r["teacher"], r["length"], r["batch"]) for r in doc["ratios"]}
    assert len(pairs) == 2 * 2 * 2
    ratio = doc["ratios"][0]
    key = (ratio["teacher"], ratio["length"], ratio["batch"])
    student = by[(ratio["student"], ratio["length"], ratio["batch"])]
    assert ratio["prefill_speedup"] == pytest.approx(by[key]["prefill_ms"] / student["prefill_ms"])


def test_replicated_prefill(candidates, monkeypatch):
    """A prompt prefilled for one row and its cache replicated to three decodes exactly like a
    real three-row prefill of that prompt (growing and static KV, Mamba and hybrid states)."""
    settings = bench.BenchSettings(lengths=[24], batches=[3], decode_tokens=3, prefill_batch=1)
    doc = bench.run_bench(candidates, settings, "cpu", progress=lambda s: None)
    assert all(r["prefill_batch"] == 1 and r["batch"] == 3 for r in doc["results"])

    record: dict = {}

    def spy_prefill(model, cache, ids, chunk_size=None):
        logits = prefill(model, cache, ids, chunk_size=chunk_size)
        record.update(ids=ids, decode=[])
        return logits

    def spy_forward(forward):
        def wrapped(*args, **kwargs):
            out = forward(*args, **kwargs)
            if "decode" in record:
                record["decode"].append(out.logits[:, -1])
            return out

        return wrapped

    monkeypatch.setattr(bench, "prefill", spy_prefill)
    for model in {id(c.model): c.model for c in candidates}.values():
        monkeypatch.setattr(model, "forward", spy_forward(model.forward))
    cpu = torch.device("cpu")
    for candidate in candidates:
        record.clear()
        bench.measure(candidate, 24, 3, settings, cpu)
        ids, replicated = record.pop("ids"), torch.stack(record.pop("decode"))
        assert ids.shape == (1, 24) and replicated.shape[:2] == (3, 3)

        static = candidate.kv_cache == "static"
        model = candidate.model
        cache = LMCache(model, 3, cpu, model.dtype, max_length=24 + 4 if static else None)
        with torch.no_grad():
            logits = prefill(model, cache, ids.expand(3, -1), chunk_size=candidate.prefill_chunk)
            batched = []
            for _ in range(3):
                tokens = logits.argmax(-1)
                logits = model(tokens[:, None], cache=cache).logits[:, -1]
                batched.append(logits)
        batched = torch.stack(batched)
        torch.testing.assert_close(replicated, batched, rtol=1e-5, atol=1e-5, msg=candidate.name)
        assert torch.equal(replicated.argmax(-1), batched.argmax(-1)), candidate.name


def test_out_of_memory_is_recorded_and_the_run_goes_on(candidates, monkeypatch):
    real = bench.measure

    def fake(candidate, length, batch, settings, device, graph=None):
        if candidate.name == "teacher" and length >= 32 and batch >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return real(candidate, length, batch, settings, device, graph)

    monkeypatch.setattr(bench, "measure", fake)
    settings = bench.BenchSettings(
        lengths=[16, 32, 48], batches=[1, 2, 4], decode_tokens=1, warmup=False
    )
    doc = bench.run_bench(candidates[:1], settings, "cpu")
    status = {(r["model"], r["length"], r["batch"]): r["status"] for r in doc["results"]}
    assert status[("teacher", 32, 2)] == "oom" and "1 TiB" in doc["results"][4]["error"]
    assert status[("teacher", 48, 2)] == status[("teacher", 32, 4)] == "skipped"
    assert status[("teacher", 48, 1)] == status[("teacher", 16, 4)] == "ok"


def test_plot_writes_png(candidates, tmp_path):
    settings = bench.BenchSettings(lengths=[16, 32], decode_tokens=1, warmup=False)
    doc = bench.run_bench(candidates[::2], settings, "cpu")
    doc["results"].append({"model": "teacher", "length": 64, "batch": 1, "status": "oom"})
    path = tmp_path / "bench.png"
    bench.plot(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_graph_rows_of_attention_models_need_a_static_cache(candidates):
    teacher = candidates[0].model
    with pytest.raises(ValueError, match="static KV cache"):
        bench.Candidate("teacher", "teacher", teacher, "growing", cuda_graph=True)
    bench.Candidate("teacher", "teacher", teacher, "static", cuda_graph=True)


def test_random_model_shapes():
    config = text_config(HOVLE_2_6B)
    assert config.num_layers == 32 and config.vocab_size == 92553
    assert {(s.num_heads, s.num_kv_heads, s.head_dim) for s in config.stacks} == {(16, 8, 128)}
    with pytest.raises(ValueError, match="hovle-2.6b"):
        bench.random_model("nope", "cpu", torch.float32)


def test_cli_bench_json_and_plot(llama_dir, tmp_path):
    student_dir = tmp_path / "student"
    runner = CliRunner()
    seeded = runner.invoke(
        app, ["seed", "--teacher", str(llama_dir), "--out", str(student_dir), "-a", "every:2"]
    )
    assert seeded.exit_code == 0, seeded.output
    plot = tmp_path / "b.png"
    args = ["bench", "--teacher", str(llama_dir), "--student", str(student_dir)]
    args += ["--seed-layout", "none", "--lengths", "12,20", "-n", "2", "--device", "cpu"]
    args += ["--dtype", "float32", "--prefill-chunk", "8", "--json", "--plot", str(plot)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # the tables fit the 80-column console, nothing cut
    assert "…" not in result.stderr and max(map(len, result.stderr.splitlines())) <= 80
    doc = json.loads(result.stdout)
    names = [m["name"] for m in doc["models"]]
    assert names == [
        "teacher",
        "teacher (static KV)",
        "teacher (transformers)",
        "teacher (transformers, static KV)",
        "student",
        "student (static KV)",
        "seeded:none",
    ]
    assert {r["status"] for r in doc["results"]} == {"ok"}
    assert doc["teacher"] == str(llama_dir) and plot.exists()


def cli(monkeypatch, capfd, *args: str) -> tuple[int, str]:
    """``mmdistill *args`` through the console entry point: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mmdistill", *args])
    capfd.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
    return code, capfd.readouterr().err


def test_cli_bench_needs_one_teacher(llama_dir, monkeypatch, capfd):
    """Neither or both of --teacher/--random-shape: a user error (exit 2, one line and a hint,
    no traceback)."""
    message = "error: give exactly one of --teacher SRC and --random-shape NAME"
    for source in ([], ["--teacher", str(llama_dir), "--random-shape", "tiny"]):
        code, err = cli(monkeypatch, capfd, "bench", *source, "--seed-layout", "none")
        assert code == 2, err
        first, hint = err.strip().splitlines()
        assert first == message and hint.startswith("hint: ")


def test_cli_bench_teacher_alone_and_nothing_to_measure(llama_dir, monkeypatch, capfd):
    """Without students the teacher rows alone are measured (a baseline); with --skip-teacher
    as well there is nothing to measure, which is a clear error."""
    args = ["bench", "--teacher", str(llama_dir), "--lengths", "12", "-n", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--dtype", "float32", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [m["name"] for m in doc["models"]] == [
        "teacher",
        "teacher (static KV)",
        "teacher (transformers)",
        "teacher (transformers, static KV)",
    ]
    assert doc["ratios"] == [] and {r["status"] for r in doc["results"]} == {"ok"}
    code, err = cli(monkeypatch, capfd, *args, "--skip-teacher")
    assert code == 2 and "nothing to measure" in err and "Traceback" not in err


def test_table_of_a_long_run_fits_80_columns():
    """A 1M-token row with a two-minute prefill prints whole in 80 columns (prefill in s)."""
    from rich.console import Console

    from mmdistill.commands.bench_cmd import results_table

    row = {
        "model": "seeded:every:4 (static KV, graph)",
        "length": 1048576,
        "batch": 1,
        "status": "ok",
        "prefill_ms": 121698.4,
        "decode_ms_per_token": 12.46,
        "decode_tokens_per_s": 80.3,
        "peak_memory_bytes": 40_164_000_000,
    }
    document = {"device": {"type": "cuda", "name": "NVIDIA H200"}, "ratios": [], "results": [row]}
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(results_table(document))
    text = console.export_text()
    assert "…" not in text and "1m" in text and " 122 " in text and "prefill in s" in text
