"""``mmdistill generate``: chat-templated prompts, images, streaming and errors, checked against
generation written independently (transformers' generate; HoVLE's own prompt builder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mmdistill
from mmdistill.cli import app
from mmdistill.errors import DataError
from mmdistill.frontends.hovle import chat_prompt, prepare_images
from mmdistill.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_dir(chat_llama):
    directory, hf_model, _ = chat_llama
    return directory, hf_model


@pytest.fixture(scope="module")
def hovle_student(tmp_path_factory):
    from mmdistill.teachers.tiny_hovle import write_tiny_hovle

    root = tmp_path_factory.mktemp("hovle")
    write_tiny_hovle(root / "teacher", seed=0)
    teacher = mmdistill.load_teacher(str(root / "teacher"))
    mmdistill.seed(teacher, attention_layers="every:2").save_pretrained(root / "student")
    image = root / "red.png"
    Image.new("RGB", (56, 56), (220, 30, 30)).save(image)
    return root / "student", image


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["generate", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


def test_hf_model_uses_its_chat_template(chat_dir):
    directory, hf_model = chat_dir
    code, out = run(str(directory), "--prompt", "Say hi.", "-n", "6", "--json")
    assert code == 0
    doc = json.loads(out)
    tokenizer = load_tokenizer(directory)
    text = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    assert doc["prompt_tokens"] == ids.shape[1]
    expected = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=[2, 4],
        pad_token_id=2,
    )[0, ids.shape[1] :].tolist()
    stop = next((i for i, t in enumerate(expected) if t in (2, 4)), len(expected))
    assert doc["text"] == tokenizer.decode(expected[:stop])
    # streamed output (no --json) is the same text
    code, streamed = run(str(directory), "--prompt", "Say hi.", "-n", "6")
    assert code == 0 and streamed == doc["text"] + "\n"


def test_raw_prompt_and_sampling_seed(chat_dir, tmp_path):
    directory, _ = chat_dir
    code, out = run(str(directory), "--prompt", "And God", "--raw", "-n", "5", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["prompt_tokens"] == 1 + len("And God")  # BOS + chars
    assert doc["decode"] == "eager" and doc["first_token_seconds"] > 0  # CPU: the reference
    assert doc["new_tokens"] < 2 or doc["decode_tokens_per_s"] > 0
    code, eager = run(
        str(directory), "--prompt", "And God", "--raw", "-n", "5", "--json", "--eager"
    )
    assert code == 0 and json.loads(eager)["text"] == doc["text"]
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("And God", encoding="utf-8")
    code, out = run(str(directory), "--prompt-file", str(prompt_file), "--raw", "-n", "5", "--json")
    assert code == 0 and json.loads(out)["text"] == doc["text"]
    prompt_file.write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="not UTF-8"):
        run(str(directory), "--prompt-file", str(prompt_file), "--raw")
    for args in ([], ["--prompt", "hi", "--prompt-file", str(prompt_file)]):
        result = CliRunner().invoke(app, ["generate", str(directory), *args])
        assert result.exit_code == 2 and "--prompt-file FILE (one)" in result.output
    sample = ["--prompt", "hi", "-n", "8", "--temperature", "1.5", "--json"]

    def text(*args):
        code, out = run(str(directory), *args)
        assert code == 0
        return json.loads(out)["text"]

    # the same seed, the same sample; another seed, another; greedy is neither
    assert text(*sample, "--seed", "3") == text(*sample, "--seed", "3")
    assert text(*sample, "--seed", "4") != text(*sample, "--seed", "3")
    assert text("--prompt", "hi", "-n", "8", "--json") != text(*sample, "--seed", "3")


def test_hovle_student_with_image(hovle_student):
    student_dir, image = hovle_student
    code, out = run(
        str(student_dir), "--prompt", "What colour?", "--image", str(image), "-n", "8", "--json"
    )
    assert code == 0
    doc = json.loads(out)
    student = mmdistill.load_student(student_dir)
    tokenizer = load_tokenizer(student_dir)
    pixel_values, tiles = prepare_images(student.config, [image])
    ids = torch.tensor([tokenizer.encode(chat_prompt(student.config, "What colour?", tiles))])
    assert doc["prompt_tokens"] == ids.shape[1]
    stops = {2, tokenizer.token_to_id("<|im_end|>")}
    seq = ids
    with torch.no_grad():  # greedy by full recomputation, no cache
        for _ in range(doc["new_tokens"]):
            nxt = student(seq, pixel_values=pixel_values).logits[0, -1].argmax()
            if int(nxt) in stops:
                break
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
    assert doc["text"] == tokenizer.decode(seq[0, ids.shape[1] :].tolist())


def test_image_errors(hovle_student, chat_dir, tmp_path):
    student_dir, image = hovle_student
    with pytest.raises(DataError, match="text-only"):
        run(str(chat_dir[0]), "--prompt", "hi", "--image", str(image))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = str(tmp_path / "nope.png")
    proc = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "generate", str(student_dir), "-p", "hi"]
        + ["--image", missing],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "image file not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["generate", "eval", "bench"])
def test_bad_device_or_dtype_is_a_clear_error_before_loading(command, tmp_path):
    """A mistyped device, CUDA on a machine without it and an unknown dtype stop before any model
    loads, with one line naming the fix (no torch traceback)."""
    from mmdistill.commands.options import resolve_device
    from mmdistill.errors import MmdistillError

    args = {
        "generate": ["generate", str(tmp_path), "--prompt", "hi"],
        "eval": ["eval", "--student", str(tmp_path), "--teacher", str(tmp_path), "--tasks", ""],
        "bench": ["bench", "--teacher", str(tmp_path), "--seed-layout", "none"],
    }[command]
    if command == "eval":
        data = tmp_path / "d.txt"
        data.write_text("some text\n")
        args = [*args[:-2], "--data", str(data)]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--device", "cdua"])
    assert isinstance(result.exception, MmdistillError), result.output
    assert "unknown device 'cdua'" in str(result.exception)
    result = runner.invoke(app, [*args, "--dtype", "float8"])
    assert result.exit_code == 2 and "unknown dtype" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, [*args, "--device", "cuda"])
        assert "CUDA is not available here" in str(result.exception)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MmdistillError, match="unsupported device"):
        resolve_device("meta")
