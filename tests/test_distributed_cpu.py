"""Several processes on the CPU (gloo): DeepSpeed ZeRO-2 and ZeRO-3 on two processes reproduce a
one-process run with the same global batch (gradient accumulation 2), stage by stage. Nothing is
compiled: DeepSpeed's JIT C++ ops (e.g. its shared-memory all-reduce) would land in
``TORCH_EXTENSIONS_DIR``, which must stay absent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Two worker processes per run: not in the default suite; `make test-distributed` (CI) runs it.
pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    *(f"stages.{i}.steps=3" for i in range(3)),
    "checkpoint.every=2",
    "data.shapes.n_train=48",
    "data.shapes.n_eval=8",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tiny(launcher: list[str], out: Path, cache: Path, overrides: list[str]) -> list[dict]:
    """``mmdistill run recipes/tiny.yaml`` (shortened) under ``launcher``; the stage reports."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MMDISTILL_CACHE": str(cache),
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
    }
    cmd = [
        *launcher,
        "-m",
        "mmdistill.cli",
        "run",
        str(ROOT / "recipes" / "tiny.yaml"),
        f"output_dir={out}",
        *SHORT,
        *overrides,
        "--json",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    built = cache / "torch_extensions"
    assert not built.exists(), f"compiled at run time: {sorted(p.name for p in built.rglob('*'))}"
    return json.loads(done.stdout)["stages"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache):
    accumulate = [f"stages.{i}.grad_accum=2" for i in range(3)]
    return run_tiny([sys.executable], tmp_path_factory.mktemp("one") / "run", cache, accumulate)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_match_one(tmp_path, cache, one_process, zero):
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    config = f"distributed.deepspeed={ROOT / 'recipes' / f'{zero}.json'}"
    stages = run_tiny(launcher, tmp_path / "run", cache, [config])
    assert [s["name"] for s in stages] == [s["name"] for s in one_process]
    for ours, ref in zip(stages, one_process, strict=True):
        assert ours["steps"] == ref["steps"]
        for key in ("initial_loss", "final_loss"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-5), (ours["name"], key)
