"""One conversation parser and one chat format behind ``mmdistill run``'s data, ``mmdistill eval``
and ``mmdistill generate``: a conversation written in either turn convention, with speakers in any
case, gives the same messages and the same token ids on all three paths."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import mmdistill
from mmdistill.chat import IMAGE_PLACEHOLDER, record_messages
from mmdistill.chat_format import build_generation_prompt, chat_format_for
from mmdistill.data.loader import open_source
from mmdistill.data.text import DataContext
from mmdistill.errors import DataError
from mmdistill.evaluation import evaluate, prepare_file, tokenizer_for
from mmdistill.frontends.hovle import prepare_images
from mmdistill.frontends.hovle_image import IMG_CONTEXT_TOKEN

TURNS = [
    ("human", "What colour is it?"),
    ("gpt", "red"),
    ("human", "And its size?"),
    ("gpt", "small"),
]
SPELLINGS = {
    "from/value": lambda who, text: {"from": who, "value": text},
    "from/value, upper case": lambda who, text: {"from": who.upper(), "value": text},
    "role/content, mixed case": lambda who, text: {
        "role": {"human": "User", "gpt": "Assistant"}[who],
        "content": text,
    },
}


def record(spelling: str, images: list[str]) -> dict:
    turns = [SPELLINGS[spelling](who, text) for who, text in TURNS]
    return {"task": "qa", "image": images, "conversations": turns}


def test_both_conventions_and_any_case_give_the_same_messages():
    expected = [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nWhat colour is it?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And its size?"},
        {"role": "assistant", "content": "small"},
    ]
    for spelling in SPELLINGS:
        assert record_messages(record(spelling, ["a.png"]), "r") == (expected, ["a.png"])
    system = {"conversations": [{"role": "SYSTEM", "content": "Be brief."}]}
    assert record_messages(system, "r")[0] == [{"role": "system", "content": "Be brief."}]
    # Without images, a literal <image> stays text (a multimodal format rejects it, below).
    text = {"conversations": [{"from": "human", "value": "an <image> tag"}]}
    assert record_messages(text, "r")[0][0]["content"] == "an <image> tag"
    for bad in ({"from": "robot", "value": "x"}, {"role": "user", "content": 3}, "hi"):
        with pytest.raises(DataError, match=r'r: conversations\[0\] needs "from" \(or "role"\)'):
            record_messages({"conversations": [bad]}, "r")
    with pytest.raises(DataError, match="no user turn"):
        record_messages({"image": "a.png", "conversations": [{"from": "gpt", "value": "x"}]}, "r")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    Image.new("RGB", (56, 56), (220, 30, 30)).save(directory / "red.png")
    Image.new("RGB", (84, 56), (30, 30, 220)).save(directory / "blue.png")
    return directory


@pytest.mark.parametrize("kind", ["hovle", "chat_llama"])
def test_run_eval_and_generate_tokenise_a_conversation_alike(kind, request, image_dir, tmp_path):
    model = request.getfixturevalue(kind)
    model = model[2] if kind == "chat_llama" else model
    images = [str(image_dir / "red.png")] if kind == "hovle" else []
    tokenizer = tokenizer_for(model)
    seen = set()
    for n, spelling in enumerate(SPELLINGS):
        path = tmp_path / f"{n}.jsonl"
        path.write_text(json.dumps(record(spelling, images)) + "\n")
        # mmdistill run: the training data pipeline
        ctx = DataContext(model.config, model.config.teacher["directory"])
        train = open_source(path, ctx).get(0).input_ids
        # mmdistill eval: the whole conversation is what is scored, each answer a question
        data = prepare_file(path, model, tokenizer)
        assert data.sequences[0].ids == train
        assert [q.reference for q in data.questions] == ["red", "small"]
        # mmdistill generate: the first question as a one-turn prompt
        prompt, _, _ = build_generation_prompt(model, tokenizer, TURNS[0][1], images)
        assert data.questions[0].ids == prompt
        seen.add((tuple(train), tuple(prompt)))
    assert len(seen) == 1
    fmt = chat_format_for(model.config, tokenizer)
    messages = record_messages(record("from/value", images), "r")[0]
    tiles = prepare_images(model.config, images)[1]
    assert train == fmt.encode(messages, tiles)  # the whole conversation, tokenised once


def test_images_go_one_placeholder_each(hovle, image_dir, tmp_path):
    """generate with two images and no placeholder gets two image spans (it had one, and the
    model refused the second image's tiles); an eval question's images are those its prompt
    shows (a conversation whose second image comes in a later turn could not be answered)."""
    model = hovle
    tokenizer = tokenizer_for(model)
    paths = [image_dir / "red.png", image_dir / "blue.png"]
    ids, pixel_values, _ = build_generation_prompt(model, tokenizer, "Same colour?", paths)
    context = tokenizer.token_to_id(IMG_CONTEXT_TOKEN)
    per_tile = model.config.front_end["num_image_token"]
    assert ids.count(context) == pixel_values.shape[0] * per_tile
    assert mmdistill.generate(model, torch.tensor([ids]), pixel_values=pixel_values).shape[1] > 0
    with pytest.raises(DataError, match="1 <image> placeholders for 0 images"):
        build_generation_prompt(model, tokenizer, "<image> what?")

    two = [("human", "<image>\nWhat colour?"), ("gpt", "red"), ("human", "<image>\nThis one?")]
    turns = [SPELLINGS["from/value"](who, text) for who, text in [*two, ("gpt", "blue")]]
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps({"image": [str(p) for p in paths], "conversations": turns}) + "\n")
    data = prepare_file(path, model, tokenizer)
    assert [q.images for q in data.questions] == [paths[:1], paths]
    result = evaluate(model, model, [path], max_new_tokens=2)
    assert result["answer_accuracy"]["questions"] == 2
