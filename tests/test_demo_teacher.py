"""The demo teacher (``builtin:shapes-hovle``): the shipped model answers held-out questions and
scores its answers in the conversation tokenisation ``mmdistill run``/``eval`` use; the builder
trains deterministically on that tokenisation; overrides are checked; (slow) the full build."""

from __future__ import annotations

import math

import pytest
import torch

import mmdistill
from mmdistill.chat import record_messages
from mmdistill.data.conversations import ConversationSource
from mmdistill.data.synthetic import (
    generate_samples,
    majority_baseline_accuracy,
    write_multimodal_jsonl,
)
from mmdistill.data.text import DataContext
from mmdistill.demo.questions import evaluate_answers
from mmdistill.demo.teacher import BUILTIN_NAME, DEMO_KINDS, SHIPPED_DIR
from mmdistill.demo.teacher_builder import (
    build_shapes_teacher,
    shipped_teacher,
    train_teacher,
    write_teacher,
)
from mmdistill.demo.teacher_config import ShapesTeacherConfig, config_with_overrides
from mmdistill.demo.teacher_data import ImageTable, conversation_examples
from mmdistill.errors import TeacherError
from mmdistill.frontends.hovle import chat_prompt
from mmdistill.tokenizer import load_tokenizer

TINY = [
    "hidden_size=32",
    "num_attention_heads=4",
    "num_key_value_heads=2",
    "intermediate_size=64",
    "num_embedding_layers=1",
    "num_llm_layers=2",
    "n_images=24",
    "text_lines=8",
    "steps=12",
    "batch_size=4",
    "dialogue_batch_size=2",
    "caption_batch_size=2",
    "text_batch_size=2",
    "warmup_front_end_steps=2",
    "warmup_front_end_batch_size=4",
    "lr=1e-2",
    "schedule.warmup_steps=2",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    trained = train_teacher(config_with_overrides(TINY))
    assert torch.equal(torch.get_rng_state(), before), "the build touched the global RNG"
    return trained


@pytest.fixture(scope="module")
def shipped():
    return mmdistill.load_teacher(f"builtin:{BUILTIN_NAME}"), load_tokenizer(SHIPPED_DIR)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A few held-out images, and their conversations written as ``builtin:shapes`` writes them."""
    samples = generate_samples(10, 1, split="eval", kinds=DEMO_KINDS)
    out = tmp_path_factory.mktemp("held_out")
    return samples, write_multimodal_jsonl(samples, out, "eval", include_captions=True)


def test_shipped_teacher_answers_held_out_questions(shipped, held_out):
    teacher, tokenizer = shipped
    samples, _ = held_out
    result = evaluate_answers(teacher, tokenizer, samples)
    train = generate_samples(1000, 0, kinds=DEMO_KINDS)
    baseline = majority_baseline_accuracy(train, samples)
    assert result["questions"] >= 40
    assert result["accuracy"] >= baseline + 0.3, (result["accuracy"], baseline)


def test_chat_prompt_is_the_prefix_of_the_rendered_conversation(shipped, held_out):
    """``chat()``'s prompt, token for token, starts the conversation ``mmdistill run`` reads, and
    the answer follows it as one token, then ``<|im_end|>``."""
    teacher, tokenizer = shipped
    samples, jsonl = held_out
    source = ConversationSource(jsonl, DataContext(teacher.config, str(SHIPPED_DIR)))
    end = tokenizer.token_to_id("<|im_end|>")
    checked = 0
    for i in range(len(source)):
        messages, _ = record_messages(source.lines.record(i), str(i))
        ids = source.get(i).input_ids
        question = messages[0]["content"].removeprefix("<image>\n")
        prompt = tokenizer.encode(chat_prompt(teacher.config, question, [1]))
        assert ids[: len(prompt)] == prompt
        answer = messages[1]["content"]
        if len(answer.split()) == 1:
            assert ids[len(prompt) + 1] == end, (answer, ids[len(prompt) :])
            assert tokenizer.decode(ids[len(prompt) : len(prompt) + 1]) == answer
            checked += 1
    assert checked == len(samples)


def test_shipped_teacher_is_sure_of_answers_in_the_conversation_tokenisation(shipped, held_out):
    """The tokens ``mmdistill eval`` scores (every assistant turn): perplexity near 1."""
    teacher, tokenizer = shipped
    _, jsonl = held_out
    source = ConversationSource(jsonl, DataContext(teacher.config, str(SHIPPED_DIR)))
    images = ImageTable()
    examples = conversation_examples(source, tokenizer, images)
    nll, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            if example.kind == "caption":
                continue
            ids = torch.tensor([example.ids])
            logits = teacher(ids, pixel_values=images.tiles[example.image]).logits[0, :-1]
            target = torch.tensor(example.targets[1:])
            logp = logits.float().log_softmax(-1)[target]
            nll -= logp.gather(-1, ids[0, 1:][target][:, None]).sum().item()
            count += int(target.sum())
    assert count > 80
    assert math.exp(nll / count) < 1.5


def test_tiny_build_learns_deterministically(tiny):
    assert len(tiny.losses) == 12
    assert sum(tiny.losses[-3:]) < sum(tiny.losses[:3]) - 1.0, tiny.losses
    again = train_teacher(config_with_overrides(TINY))
    assert again.losses == tiny.losses
    assert again.tokenizer_model == tiny.tokenizer_model
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key


def test_tiny_build_writes_a_loadable_hovle_teacher(tiny, tmp_path):
    write_teacher(tiny, tmp_path)
    loaded = mmdistill.load_teacher(str(tmp_path))
    assert loaded.config.teacher["adapter"] == "hovle"
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_overrides_use_the_dotlist_syntax_and_are_checked():
    cfg = config_with_overrides(["steps=7", "lr=1e-2", "kinds=[count,size]"])
    assert (cfg.steps, cfg.lr, cfg.kinds) == (7, 0.01, ("count", "size"))
    assert config_with_overrides(["schedule.warmup_steps=3"]).schedule.warmup_steps == 3
    with pytest.raises(TeacherError, match="stepz: unknown key"):
        config_with_overrides(["stepz=7"])
    with pytest.raises(TeacherError, match="steps"):
        config_with_overrides(["steps=many"])
    with pytest.raises(TeacherError, match="kinds"):
        config_with_overrides(["kinds=[count,colour]"])
    with pytest.raises(TeacherError, match="schedule.kind"):
        config_with_overrides(["schedule.kind=linear"])
    with pytest.raises(TeacherError, match="key=value"):
        config_with_overrides(["steps"])


def test_builtin_shapes_hovle_is_the_shipped_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDISTILL_CACHE", str(tmp_path))
    teacher = mmdistill.load_teacher(f"builtin:{BUILTIN_NAME}")
    assert teacher.config.teacher["adapter"] == "hovle"
    assert teacher.config.teacher["directory"] == str(SHIPPED_DIR.resolve())
    assert not (tmp_path / "builtin").exists()  # nothing trained or copied on first use


def test_shipped_teacher_was_built_with_the_default_config():
    """The repository's copy matches today's default config and its recorded weights."""
    assert shipped_teacher() == SHIPPED_DIR
    assert shipped_teacher(config_with_overrides(["steps=1"])) is None


@pytest.mark.slow
def test_full_build_answers_held_out_questions(tmp_path):
    record = build_shapes_teacher(tmp_path, ShapesTeacherConfig())
    teacher = mmdistill.load_teacher(str(tmp_path))
    tokenizer = load_tokenizer(tmp_path)
    held_out = generate_samples(200, 0, split="eval", kinds=DEMO_KINDS)
    result = evaluate_answers(teacher, tokenizer, held_out)
    assert result["accuracy"] >= 0.85, (result, record)
