"""The demo's answer scoring against an independent per-question computation."""

from __future__ import annotations

import math

import torch

import mmdistill
from mmdistill.data.synthetic import generate_samples
from mmdistill.demo.pipeline import score_answers
from mmdistill.evaluation import tokenizer_for
from mmdistill.frontends.hovle import chat_prompt, prepare_images


def test_score_answers_matches_one_question_at_a_time():
    teacher = mmdistill.load_teacher("builtin:tiny-hovle")
    tokenizer = tokenizer_for(teacher)
    samples = generate_samples(3, seed=1, image_size=56, split="eval", kinds=("count", "size"))
    linear = mmdistill.seed(teacher, "none")
    scores = score_answers(
        {"teacher": teacher, "same": mmdistill.seed(teacher, "all"), "linear": linear},
        tokenizer,
        samples,
        batch_size=4,
    )
    assert scores["same"]["kl"] < 1e-6 and scores["same"]["top1_agreement"] == 1.0
    assert scores["linear"]["kl"] > 1e-4
    # Independent: each question alone, unpadded, summing log-probabilities of the answer tokens.
    end = tokenizer.token_to_id("<|im_end|>")
    nll, kl, tokens = 0.0, 0.0, 0
    for sample in samples:
        for question, answer in sample.qa:
            pixels, tiles = prepare_images(teacher.config, [sample.image])
            prompt = tokenizer.encode(chat_prompt(teacher.config, question, tiles))
            reply = tokenizer.encode(answer, add_special_tokens=False) + [end]
            ids = torch.tensor([prompt + reply])
            with torch.no_grad():
                t = teacher(ids, pixel_values=pixels).logits[0].log_softmax(-1)
                s = linear(ids, pixel_values=pixels).logits[0].log_softmax(-1)
            for j, token in enumerate(reply):
                pos = len(prompt) + j - 1
                nll -= s[pos, token].item()
                kl += (t[pos].exp() * (t[pos] - s[pos])).sum().item()
                tokens += 1
    assert scores["linear"]["answer_tokens"] == tokens
    assert math.isclose(scores["linear"]["ppl"], math.exp(nll / tokens), rel_tol=1e-4)
    assert math.isclose(scores["linear"]["kl"], kl / tokens, rel_tol=1e-3)


def test_the_demo_runs_again_into_the_same_folder(tmp_path):
    """A second `mmdistill demo` reuses the finished runs (it used to stop at "pass --resume",
    an option `demo` does not have)."""
    from mmdistill.demo.pipeline import run_demo

    short = ["stages.0.steps=1", "stages.1.steps=1", "stages.2.steps=1"]
    short += [
        f"data.cache_dir={tmp_path / 'data'}",
        "data.shapes.n_train=16",
        "data.shapes.n_eval=4",
    ]
    first = run_demo(tmp_path, short, questions=4)
    steps = (tmp_path / "linear" / "metrics.jsonl").read_text()  # a line per optimiser step
    again = run_demo(tmp_path, short, questions=4)
    assert (tmp_path / "linear" / "metrics.jsonl").read_text() == steps  # resumed, not retrained
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in first["rows"]]
    assert [s["final_loss"] for s in again["runs"]["linear"]["stages"]] == [
        s["final_loss"] for s in first["runs"]["linear"]["stages"]
    ]
