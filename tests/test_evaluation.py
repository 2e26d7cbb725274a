"""``mmdistill.evaluation`` and ``mmdistill eval``: metrics against independent computations
(transformers' own Llama forward and generate, torch's ``kl_div``), the conversation and image
paths with a tiny HoVLE teacher, the KJV split, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import write_char_tokenizer, write_hf_model
from typer.testing import CliRunner

import mmdistill
from mmdistill.cli import app
from mmdistill.data.kjv import HELD_OUT_BOOKS, parse_bible_output, read_verses, split_verses
from mmdistill.data.synthetic import generate_samples, write_multimodal_jsonl
from mmdistill.errors import DataError
from mmdistill.evaluation import evaluate, evaluate_many, prepare_file, tokenizer_for
from mmdistill.frontends.hovle import chat_prompt, prepare_images

TEXT = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n"
    "And God said, Let there be light: and there was light.\n"
    "And God saw the light, that it was good: and God divided the light from the darkness.\n"
    "And God called the light Day, and the darkness he called Night.\n"
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "genesis.txt"
    path.write_text(TEXT * 2)
    return path


def reference_text_metrics(directory, hf_model, student, text, seq_len, max_tokens):
    """Windows, NLL, KL and agreement written from the definitions, with transformers' Llama
    as the teacher and torch's kl_div."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(directory))(text)["input_ids"]
    nll, kl, agree = [], [], []
    for start in range(0, len(ids) - 1, seq_len - 1):
        window = torch.tensor([ids[start : start + seq_len]])
        with torch.no_grad():
            t = hf_model(window).logits[0, :-1].double()
            s = student(window).logits[0, :-1].double()
        t_logp = t - t.logsumexp(-1, keepdim=True)
        s_logp = s.log_softmax(-1)
        target = window[0, 1:]
        nll += (-t_logp[torch.arange(len(target)), target]).tolist()
        kl += F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).tolist()
        agree += (t.argmax(-1) == s.argmax(-1)).tolist()
    n = max_tokens
    return math.exp(sum(nll[:n]) / n), sum(kl[:n]) / n, sum(agree[:n]) / n


def test_all_layout_equals_teacher_and_linear_student_differs(chat_llama, text_file):
    _, _, teacher = chat_llama
    students = {
        "all": mmdistill.seed(teacher, attention_layers="all"),
        "none": mmdistill.seed(teacher, attention_layers="none"),
    }
    results = evaluate_many(students, teacher, [text_file], seq_len=64, batch_size=2)
    same, linear = results["all"], results["none"]
    assert same["tokens"] == len(TEXT * 2)  # BOS + one token per character, all but the first
    assert same["kl"] < 1e-4 and same["top1_agreement"] == 1.0
    assert same["student_ppl"] == pytest.approx(same["teacher_ppl"], rel=1e-6)
    assert linear["kl"] > 1e-3 and linear["top1_agreement"] < 1.0
    assert linear["teacher_ppl"] == same["teacher_ppl"]
    assert same["teacher_layout"] == "4 attention + 0 mamba layers"
    assert linear["student_layout"] == "0 attention + 4 mamba layers"


def test_metrics_match_independent_computation(chat_llama, text_file):
    directory, hf_model, teacher = chat_llama
    student = mmdistill.seed(teacher, attention_layers="every:2")
    # batch 3 right-pads the short last window; max_tokens cuts inside a window
    result = evaluate(student, teacher, [text_file], seq_len=37, batch_size=3, max_tokens=300)
    ppl, kl, agree = reference_text_metrics(directory, hf_model, student, TEXT * 2, 37, 300)
    assert result["tokens"] == 300
    assert result["teacher_ppl"] == pytest.approx(ppl, rel=1e-5)
    assert result["kl"] == pytest.approx(kl, rel=1e-4)
    assert result["top1_agreement"] == pytest.approx(agree)
    assert result["files"][0]["kind"] == "text"


def test_conversations_score_answer_tokens_and_generate_answers(chat_llama, tmp_path):
    directory, hf_model, teacher = chat_llama
    turns = [
        {"from": "human", "value": "What is two plus two?"},
        {"from": "gpt", "value": "four"},
        {"from": "human", "value": "And three plus three?"},
        {"from": "gpt", "value": "six"},
    ]
    path = tmp_path / "chat.jsonl"
    records = [{"conversations": turns}, {"text": "And God saw that it was good."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = tokenizer_for(teacher)
    data = prepare_file(path, teacher, tokenizer)
    assert data.kind == "mixed" and data.documents == 2
    chat = data.sequences[0]
    scored = [i for i, keep in zip(chat.ids, chat.targets, strict=True) if keep]
    assert tokenizer.decode(scored, skip_special_tokens=False) == (
        "four<|im_end|>\nsix<|im_end|>\n"
    )
    messages = [{"role": "user", "content": t["value"]} for t in turns[:1]]
    first_prompt = tokenizer.inner.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert data.questions[0].ids == tokenizer.encode(first_prompt, add_special_tokens=False)
    assert [q.reference for q in data.questions] == ["four", "six"]
    # 11 answer tokens ("four", <|im_end|>, "\n", "six", ...); the text record: every character
    assert data.tokens == 11 + len("And God saw that it was good.")


@pytest.fixture(scope="module")
def chat_llama_other(tmp_path_factory):
    """(directory, transformers model, model): another tiny Llama (other weights), same tokenizer."""
    directory = tmp_path_factory.mktemp("chat-llama-other")
    vocab = write_char_tokenizer(directory)
    hf_model = write_hf_model(directory, "llama", seed=1, vocab_size=vocab, eos_token_id=2)
    return directory, hf_model, mmdistill.load_teacher(str(directory))


def hf_answer(hf_model, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """transformers' own greedy generate on an unpadded prompt, cut at the first stop token."""
    stops = [2, tokenizer.token_to_id("<|im_end|>")]
    ids = torch.tensor([prompt])
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=2,
    )
    new = out[0, ids.shape[1] :].tolist()
    stop = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:stop]).strip()


def test_answer_accuracy_of_different_teacher_and_student(chat_llama, chat_llama_other, tmp_path):
    """Teacher and student are different models; the references are chosen from their own
    (transformers-generated) answers so that the student gets 2 of 3 right and the teacher 1.
    Batches of 2 left-pad the shorter prompt."""
    from mmdistill.data.synthetic import normalize_answer

    _, hf_teacher, teacher = chat_llama
    _, hf_student, student = chat_llama_other
    questions = ["What is two plus two?", "Name a colour.", "Is it day?"]

    def write(references):
        path = tmp_path / "qa.jsonl"
        records = [
            {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": r}]}
            for q, r in zip(questions, references, strict=True)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    tokenizer = tokenizer_for(teacher)
    prompts = [q.ids for q in prepare_file(write(["x"] * 3), teacher, tokenizer).questions]
    assert len({len(p) for p in prompts}) > 1  # the batches are padded
    by_teacher = [hf_answer(hf_teacher, tokenizer, p, 5) for p in prompts]
    by_student = [hf_answer(hf_student, tokenizer, p, 5) for p in prompts]
    for t, s in zip(by_teacher, by_student, strict=True):  # the models answer differently
        assert normalize_answer(t) and normalize_answer(s)
        assert normalize_answer(t) != normalize_answer(s)

    path = write([by_student[0], by_student[1], by_teacher[2]])
    result = evaluate(student, teacher, [path], max_new_tokens=5, batch_size=2)
    assert result["answer_accuracy"] == {"teacher": 1 / 3, "student": 2 / 3, "questions": 3}
    examples = result["files"][0]["examples"]
    assert [e["teacher"] for e in examples] == by_teacher
    assert [e["student"] for e in examples] == by_student


@pytest.fixture(scope="module")
def hovle_teacher(tmp_path_factory):
    from mmdistill.teachers.tiny_hovle import write_tiny_hovle

    directory = tmp_path_factory.mktemp("hovle")
    write_tiny_hovle(directory, seed=0)
    return mmdistill.load_teacher(str(directory))


@pytest.fixture(scope="module")
def shapes_jsonl(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    samples = generate_samples(2, seed=0, split="eval", kinds=("count", "colour_at", "exists"))
    return write_multimodal_jsonl(samples, out, "eval", include_captions=True), samples


def test_multimodal_jsonl_with_tiny_hovle(hovle_teacher, shapes_jsonl):
    path, samples = shapes_jsonl
    tokenizer = tokenizer_for(hovle_teacher)
    data = prepare_file(path, hovle_teacher, tokenizer)
    assert data.kind == "conversations" and data.documents == 4  # a QA and a caption record each
    # the first question's prompt is exactly what HoVLE's chat() would build for it
    question, answer = samples[0].qa[0]
    pixel_values, tiles = prepare_images(
        hovle_teacher.config, [path.parent / "images/eval_000000.png"]
    )
    expected = tokenizer.encode(chat_prompt(hovle_teacher.config, question, tiles))
    assert data.questions[0].ids == expected and data.questions[0].reference == answer
    # only the answers (and their end-of-turn tokens) are scored
    qa = data.sequences[0]
    scored = [i for i, keep in zip(qa.ids, qa.targets, strict=True) if keep]
    answers = "".join(a + "<|im_end|>" for _, a in samples[0].qa)
    assert tokenizer.decode(scored, skip_special_tokens=False) == answers
    # only QA records count for answer accuracy, not captions
    assert len(data.questions) == sum(len(s.qa) for s in samples)

    students = {
        "all": mmdistill.seed(hovle_teacher, attention_layers="all"),
        "none": mmdistill.seed(hovle_teacher, attention_layers="none"),
    }
    results = evaluate_many(
        students, hovle_teacher, [path], max_questions=3, max_new_tokens=3, batch_size=2
    )
    same, linear = results["all"], results["none"]
    assert same["tokens"] == data.tokens
    assert same["kl"] < 1e-4 and same["top1_agreement"] == 1.0
    assert same["answer_accuracy"]["questions"] == 3
    assert same["answer_accuracy"]["student"] == same["answer_accuracy"]["teacher"]
    assert linear["kl"] > 1e-4
    # independent NLL of the teacher on the first record
    ids = torch.tensor([qa.ids])
    with torch.no_grad():
        logits = hovle_teacher(ids, pixel_values=pixel_values).logits[0, :-1]
    mask = torch.tensor(qa.targets[1:])
    nll = F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum")
    assert same["files"][0]["tokens"] > int(mask.sum())
    first = evaluate(
        hovle_teacher, hovle_teacher, [path], max_tokens=int(mask.sum()), answers=False
    )
    assert first["teacher_nll"] * first["tokens"] == pytest.approx(float(nll), rel=1e-5)


def test_data_errors_are_clear(chat_llama, hovle_teacher, tmp_path):
    _, _, teacher = chat_llama
    tokenizer = tokenizer_for(teacher)
    with pytest.raises(DataError, match="not found"):
        prepare_file(tmp_path / "missing.txt", teacher, tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        prepare_file(bad, teacher, tokenizer)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        prepare_file(tmp_path / "data.csv", teacher, tokenizer)
    no_image = tmp_path / "img.jsonl"
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    no_image.write_text(json.dumps({"image": "nope.png", "conversations": turns}) + "\n")
    with pytest.raises(DataError, match="nope.png"):
        prepare_file(no_image, hovle_teacher, tokenizer_for(hovle_teacher))


BIBLE_SAMPLE = """
Ruth 1

  1 Now it came to pass in the days when the judges ruled, that there was a
famine in the land.
  2 And the name of the man was Elimelech.

Job 42

  17 So Job died, being old and full of days.
"""


def test_kjv_parsing_and_split():
    verses = parse_bible_output(BIBLE_SAMPLE)
    assert [(v.book, v.chapter, v.verse) for v in verses] == [
        ("Ruth", 1, 1),
        ("Ruth", 1, 2),
        ("Job", 42, 17),
    ]
    assert verses[0].text.endswith("that there was a famine in the land.")
    parts = split_verses(verses, held_out_books=("Job",))
    assert [v.book for v in parts["heldout"]] == ["Job"] and len(parts["train"]) == 2
    assert HELD_OUT_BOOKS == ("Ruth", "Job", "Hosea", "Zechariah", "Galatians", "Hebrews")
    with pytest.raises(DataError, match="bible-kjv"):
        read_verses(program="no-such-bible-program")


def test_kjv_from_the_bible_program():
    import shutil

    if shutil.which("bible") is None:
        pytest.skip("the bible program (Debian bible-kjv) is not installed")
    verses = read_verses()
    assert len(verses) == 31102
    parts = split_verses(verses)
    assert {v.book for v in parts["heldout"]} == set(HELD_OUT_BOOKS)
    assert len(parts["heldout"]) + len(parts["train"]) == len(verses)


def test_eval_cli_json(chat_llama, text_file, tmp_path):
    directory, hf_model, teacher = chat_llama
    mmdistill.seed(teacher, attention_layers="none").save_pretrained(tmp_path / "student")
    args = ["eval", "--student", str(tmp_path / "student"), "--teacher", str(directory)]
    result = CliRunner().invoke(
        app, [*args, "--data", str(text_file), "--max-tokens", "100", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    for key in ("teacher_ppl", "student_ppl", "kl", "top1_agreement", "tokens", "files"):
        assert key in doc
    assert doc["tokens"] == 100 and doc["kl"] > 0 and len(doc["files"]) == 1
    # the numbers are those of the definitions (the CLI's default window: 512 tokens)
    student = mmdistill.load_student(tmp_path / "student")
    ppl, kl, agree = reference_text_metrics(directory, hf_model, student, TEXT * 2, 512, 100)
    assert doc["teacher_ppl"] == pytest.approx(ppl, rel=1e-5)
    assert doc["kl"] == pytest.approx(kl, rel=1e-4)
    assert doc["top1_agreement"] == pytest.approx(agree)
    missing = CliRunner().invoke(app, [*args, "--data", str(tmp_path / "nope.txt")])
    assert isinstance(missing.exception, DataError) and missing.exception.exit_code == 2


def test_eval_tasks_without_lm_eval(chat_llama, tmp_path):
    from mmdistill.evaluation import lm_eval_available

    if lm_eval_available():
        pytest.skip("lm-eval is installed")
    directory = str(chat_llama[0])
    result = CliRunner().invoke(
        app, ["eval", "--student", directory, "--teacher", directory, "--tasks", "hellaswag"]
    )
    assert isinstance(result.exception, DataError) and "lm-eval" in str(result.exception)


@pytest.mark.slow  # importing the harness and its datasets stack takes a minute on 2 cores
def test_lm_eval_task_on_local_data(chat_llama, tmp_path):
    pytest.importorskip("lm_eval")
    from mmdistill.evaluation import run_lm_eval

    directory, _, teacher = chat_llama
    rows = [
        {"question": "And God said, Let there be", "choices": [" light", " dark"], "answer": 0},
        {"question": "And God called the light", "choices": [" Night", " Day"], "answer": 1},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    tokenizer = tokenizer_for(teacher)
    result = run_lm_eval(teacher, tokenizer, ["tiny_mc"], include_path=tmp_path)["tiny_mc"]
    # the harness's accuracy equals picking the choice with the higher summed log-likelihood
    expected = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            ids = tokenizer.encode(row["question"] + choice)
            n = len(tokenizer.encode(choice, add_special_tokens=False))
            with torch.no_grad():
                logp = teacher(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            scores.append(sum(float(logp[j - 1, ids[j]]) for j in range(len(ids) - n, len(ids))))
        expected += int(scores.index(max(scores)) == row["answer"])
    assert result["acc,none"] == pytest.approx(expected / len(rows))
    with pytest.raises(DataError, match="could not load"):
        run_lm_eval(teacher, tokenizer, ["no_such_task_xyz"])
