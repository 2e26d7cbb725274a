"""``mmdistill generate``: stream a student's (or a teacher's) answer to one prompt, or, with
``--task t2i``, draw images of a caption with a student that has an image vocabulary.

The prompt goes through the model's chat template (HoVLE's for HoVLE-format models, the
tokenizer's Jinja template for HF models) unless ``--raw``; ``--image`` adds an image for
HoVLE-format models. Text streams to stdout as it is generated; with ``--json`` nothing streams
and one JSON document is printed instead.

``--task t2i`` writes ``--out FILE.png`` (``--num-images N`` > 1: ``FILE_0.png`` ...), greedy or
sampled (``--temperature``, ``--top-k``), with optional classifier-free guidance
(``--cfg-scale``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import typer

from ..chat_format import build_generation_prompt
from ..errors import DataError
from ..evaluation import describe, is_student_dir, load_model
from ..generation import generate, resolve_path
from ..t2i_evaluation import generate_images, load_t2i_student, save_png
from ..t2i_generation import Sampling
from ..tokenizer import load_tokenizer
from .options import DEVICE_HELP, DTYPE_HELP, check_dtype, require_files, resolve_device
from .output import emit_json, err


class _Streamer:
    """When echoing, decodes the growing answer and writes only the new text (whole characters
    only). Otherwise it only notes when the first token is ready: reading a token waits for
    the GPU, and a wait per token would slow the decode it measures."""

    def __init__(self, tokenizer, stop_ids: list[int], echo: bool) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.echo = echo
        self.ids: list[int] = []
        self.stopped = False
        self.printed = ""
        self.times: list[float] = []

    def __call__(self, token: torch.Tensor) -> None:
        if not self.echo and self.times:
            return
        value = int(token[0])
        self.times.append(time.perf_counter())
        if self.stopped or value in self.stop_ids:
            self.stopped = True
            return
        self.ids.append(value)
        if not self.echo:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed) :])
            sys.stdout.flush()
            self.printed = text

    def answer(self, new_ids: list[int]) -> str:
        """The answer's text: ``new_ids`` up to the first stop id."""
        stop = next((i for i, t in enumerate(new_ids) if t in self.stop_ids), len(new_ids))
        return self.tokenizer.decode(new_ids[:stop], skip_special_tokens=True)

    def timing(self, start: float, end: float, steps: int) -> dict:
        """Seconds to the first token (decoder set-up and prefill) and the decode rate after it
        (the ``steps - 1`` later tokens per second until ``end``; ``None`` with fewer)."""
        first = self.times[0] if self.times else None
        span = end - first if first is not None and steps > 1 else 0.0
        return {
            "first_token_seconds": round(first - start, 4) if first is not None else None,
            "decode_tokens_per_s": round((steps - 1) / span, 2) if span > 0 else None,
        }


def image_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image; ``out``'s stem with ``_0``, ``_1``, ... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def generate_t2i(
    model_dir: str, caption: str, out: Path, count: int, sampling: Sampling, device: str
) -> dict:
    """Draw ``count`` images of ``caption`` and write them as PNGs; a summary for ``--json``."""
    if out.suffix.lower() != ".png":
        raise typer.BadParameter(f"{out}: give a .png path", param_hint="--out")
    with err.status(f"loading {model_dir}"):
        student = load_t2i_student(model_dir, device=device)
    start = time.perf_counter()
    images, crossed = generate_images(student, [caption] * count, sampling)
    seconds = time.perf_counter() - start
    paths = [
        save_png(image, path) for image, path in zip(images, image_paths(out, count), strict=True)
    ]
    return {
        "model": model_dir,
        "layout": describe(student.model),
        "task": "t2i",
        "prompt": caption,
        "images": [str(p) for p in paths],
        "text_tokens_in_images": crossed,
        "seconds": round(seconds, 3),
    }


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from ``--prompt`` or ``--prompt-file`` (exactly one of them)."""
    if (prompt is None) == (prompt_file is None):
        raise typer.BadParameter("give the prompt as --prompt TEXT or --prompt-file FILE (one)")
    if prompt_file is None:
        return prompt
    require_files([prompt_file], "prompt")
    try:
        return prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{prompt_file}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None


def generate_command(
    model_dir: str = typer.Argument(
        ..., metavar="DIR", help="Student directory, or any teacher source (dir, .gguf, alias)."
    ),
    prompt: str | None = typer.Option(
        None, "--prompt", "-p", help="The user's message (the caption with --task t2i)."
    ),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help="Read the prompt from this UTF-8 file (long prompts)."
    ),
    task: str = typer.Option("mmu", "--task", help="mmu (answer in text) or t2i (draw images)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="--task t2i: the PNG to write."),
    num_images: int = typer.Option(1, "--num-images", min=1, help="--task t2i: images to draw."),
    cfg_scale: float = typer.Option(
        0.0, "--cfg-scale", min=0.0, help="--task t2i: classifier-free guidance (0 = none)."
    ),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the K likeliest (0 = all)."),
    image: list[Path] = typer.Option(
        None, "--image", "-i", help="Image file (HoVLE-format models); repeat for several."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(
        0.0, "--temperature", min=0.0, help="0 = greedy; > 0 samples at this temperature."
    ),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is (no chat template)."),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    prefill_chunk: int = typer.Option(
        8192,
        "--prefill-chunk",
        min=0,
        help="Prefill the prompt in chunks of N tokens (0: one pass).",
    ),
    eager: bool = typer.Option(
        False, "--eager", help="The eager reference path (CUDA otherwise replays a captured step)."
    ),
    compile_step: bool = typer.Option(
        False, "--compile", help="torch.compile the captured step first (a one-time cost)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document, no streaming."),
) -> None:
    """Generate an answer with a student or teacher, streaming it to stdout (or images)."""
    if task not in ("mmu", "t2i"):
        raise typer.BadParameter(f"unknown task {task!r}; mmu or t2i", param_hint="--task")
    prompt = read_prompt(prompt, prompt_file)
    device = str(resolve_device(device))
    if task == "t2i":
        if out is None:
            raise typer.BadParameter("--task t2i writes images: give --out FILE.png")
        generator = torch.Generator(device=device).manual_seed(seed)
        sampling = Sampling(temperature, top_k, cfg_scale, generator, "eager" if eager else "auto")
        report = generate_t2i(model_dir, prompt, out, num_images, sampling, device)
        if as_json:
            emit_json(report)
        else:
            err.print(f"wrote {', '.join(report['images'])}", highlight=False)
        return
    images = list(image or [])
    require_files(images, "image")
    check_dtype(dtype)
    with err.status(f"loading {model_dir}"):
        model = load_model(model_dir, dtype=dtype, device=device)
    directory = model_dir if is_student_dir(model_dir) else model.config.teacher["directory"]
    tokenizer = load_tokenizer(directory)
    ids, pixel_values, stop_ids = build_generation_prompt(
        model, tokenizer, prompt, images, use_template=not raw
    )
    streamer = _Streamer(tokenizer, stop_ids, echo=not as_json)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    start = time.perf_counter()
    out = generate(
        model,
        torch.tensor([ids], device=model.device),
        pixel_values=pixel_values.to(model.device) if pixel_values is not None else None,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=stop_ids,
        generator=generator,
        streamer=streamer,
        prefill_chunk_size=prefill_chunk or None,
        decode="eager" if eager else "auto",
        compile=compile_step,
    )
    new_ids = out[0, len(ids) :].tolist()  # waits for the last step
    end = time.perf_counter()
    seconds, new_tokens, text = end - start, len(new_ids), streamer.answer(new_ids)
    if as_json:
        emit_json(
            {
                "model": model_dir,
                "layout": describe(model),
                "prompt": prompt,
                "images": [str(p) for p in images],
                "text": text,
                "prompt_tokens": len(ids),
                "new_tokens": new_tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None,
                **streamer.timing(start, end, new_tokens),
                "decode": resolve_path(model, "eager" if eager else "auto"),
            }
        )
    else:
        sys.stdout.write(text[len(streamer.printed) :] + "\n")
        sys.stdout.flush()
        err.print(
            f"[dim]{new_tokens} tokens in {seconds:.2f} s ({describe(model)})[/]", highlight=False
        )


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
