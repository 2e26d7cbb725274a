"""Distillation data: text and conversation rendering, bad images, packing, order and resume."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmdistill
from mmdistill.chat import record_messages
from mmdistill.data.conversations import ConversationSource
from mmdistill.data.loader import (
    BatchIterator,
    Mixture,
    SequenceStream,
    make_iterator,
    open_source,
    shapes_dataset,
)
from mmdistill.data.text import DataContext, Sample, TextSource
from mmdistill.errors import DataError
from mmdistill.frontends.hovle import expand_prompt, prepare_images
from mmdistill.frontends.hovle_image import render_chat
from mmdistill.recipe import DataSource, ShapesSpec


@pytest.fixture
def ctx(hovle):
    return DataContext(hovle.config, hovle.config.teacher["directory"], system_message="")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png(path: Path, colour=(200, 30, 30), size=(56, 56)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_text_sources_match_the_tokenizer(tmp_path, ctx):
    tok = ctx.tokenizer
    txt = tmp_path / "a.txt"
    txt.write_text("A small red square.\n\n  \nThree circles.\n")
    source = TextSource(txt, ctx)
    assert len(source) == 2
    assert source.get(1).input_ids == tok.encode("Three circles.") + [ctx.eos_token_id]
    jsonl = write_jsonl(tmp_path / "b.jsonl", [{"text": "The cat."}, {"input_ids": [5, 6, 7]}])
    source = open_source(jsonl, ctx)
    assert isinstance(source, TextSource)
    assert source.get(0).input_ids == tok.encode("The cat.") + [2]
    assert source.get(1).input_ids == [5, 6, 7] and source.get(1).splittable


def test_text_source_errors(tmp_path, ctx):
    bad = write_jsonl(tmp_path / "c.jsonl", [{"text": 3}, {"input_ids": [1, 10**6]}])
    source = TextSource(bad, ctx)
    with pytest.raises(DataError, match=r'c\.jsonl: record 0 has neither "text"'):
        source.get(0)
    with pytest.raises(DataError, match=r"record 1: token id 1000000 is outside"):
        source.get(1)
    (tmp_path / "d.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"d\.jsonl: record 0 is not valid JSON"):
        TextSource(tmp_path / "d.jsonl", ctx).get(0)
    with pytest.raises(DataError, match="data file not found"):
        TextSource(tmp_path / "none.txt", ctx)
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(DataError, match="has no records"):
        TextSource(tmp_path / "e.txt", ctx)
    write_jsonl(tmp_path / "f.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match=r'records need "conversations", "text" or "input_ids"'):
        open_source(tmp_path / "f.jsonl", ctx)


def test_hovle_conversation_matches_reference_rendering(tmp_path, hovle, ctx):
    image = png(tmp_path / "img" / "a.png")
    record = {
        "image": "img/a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Shape?"},
            {"from": "gpt", "value": "square"},
        ],
    }
    path = write_jsonl(tmp_path / "conv.jsonl", [record])
    source = open_source(path, ctx)
    assert isinstance(source, ConversationSource)
    sample = source.get(0)
    pixels, tiles = prepare_images(hovle.config, [image])
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Shape?"},
        {"role": "assistant", "content": "square"},
    ]
    text = render_chat(messages, "internlm2-chat", add_generation_prompt=False)
    expected = ctx.tokenizer.encode(expand_prompt(hovle.config, text, tiles))
    assert sample.input_ids == expected
    assert torch.equal(sample.pixel_values, pixels) and not sample.splittable
    context_id = hovle.config.front_end["vision"]["img_context_token_id"]
    assert (
        sample.input_ids.count(context_id) == tiles[0] * hovle.config.front_end["num_image_token"]
    )
    # The teacher accepts the rendering: one forward over ids and tiles.
    ids = torch.tensor([sample.input_ids])
    with torch.no_grad():
        assert torch.isfinite(hovle(ids, pixel_values=sample.pixel_values).logits).all()


def test_placeholder_is_added_per_image():
    messages, images = record_messages(
        {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "Same?"}]}, "r"
    )
    assert images == ["a.png", "b.png"]
    assert messages[0]["content"] == "<image>\n<image>\nSame?"
    with pytest.raises(DataError, match=r"r: 2 <image> placeholders for 1 images"):
        record_messages(
            {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}]}, "r"
        )
    with pytest.raises(DataError, match=r'r: conversations\[0\] needs "from"'):
        record_messages({"conversations": [{"from": "robot", "value": "x"}]}, "r")


@pytest.mark.parametrize("broken", ["missing", "corrupt"])
def test_bad_images_skip_or_fail(tmp_path, hovle, broken):
    good = {"image": "good.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]}
    bad = {"image": "bad.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]}
    png(tmp_path / "good.png")
    if broken == "corrupt":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = write_jsonl(tmp_path / "c.jsonl", [good, bad])
    skip = DataContext(hovle.config, hovle.config.teacher["directory"], on_bad_image="skip")
    source = ConversationSource(path, skip)
    good_sample = source.get(0)  # the good record is rendered with its image, nothing skipped
    pixel_values, _ = prepare_images(hovle.config, [tmp_path / "good.png"])
    assert torch.equal(good_sample.pixel_values, pixel_values) and not source.skipped
    assert source.get(1) is None and source.skipped == Counter(bad_image=1)
    fail = DataContext(hovle.config, hovle.config.teacher["directory"], on_bad_image="fail")
    with pytest.raises(DataError, match=r"c\.jsonl: record 1: .*bad\.png") as info:
        ConversationSource(path, fail).get(1)
    assert "on_bad_image=skip" in str(info.value)


def test_skipped_records_are_reported_and_too_many_stop_the_run(tmp_path, hovle, caplog):
    png(tmp_path / "good.png")
    records = [
        {
            "image": "good.png" if i % 3 else f"missing{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nHi"}],
        }
        for i in range(30)
    ]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    config, tokenizer_dir = hovle.config, hovle.config.teacher["directory"]
    lenient = ConversationSource(path, DataContext(config, tokenizer_dir, max_skipped_fraction=0.5))
    with caplog.at_level("WARNING", logger="mmdistill.data.conversations"):
        for _ in range(2):  # a record met again (the next stage) is reported once
            for i in range(30):
                lenient.get(i)
    reported = [r.getMessage() for r in caplog.records]
    assert len(reported) == 4 and "record 0" in reported[0] and "missing0.png" in reported[0]
    assert reported[3].endswith("10 records skipped so far (bad images)")
    strict = ConversationSource(path, DataContext(config, tokenizer_dir))
    with pytest.raises(
        DataError, match=r"8 of the 22 records read so far .*max_skipped_fraction=0\.1"
    ):
        for i in range(30):
            strict.get(i)


def test_bad_images_are_counted_by_the_iterator(tmp_path, hovle):
    png(tmp_path / "good.png")
    records = [
        {"image": name, "conversations": [{"from": "human", "value": "<image>\nHi"}]}
        for name in ("good.png", "missing.png")
    ]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    ctx = DataContext(hovle.config, hovle.config.teacher["directory"], system_message="")
    iterator = make_iterator([DataSource(source=str(path))], ctx, None, 64, True, 0, 1)
    for _ in range(3):
        next(iterator)
    skipped = iterator.skipped()
    assert list(skipped) == [f"bad_image:{path}"] and skipped[f"bad_image:{path}"] >= 1


def test_hf_teacher_conversations_use_the_chat_template(tmp_path, llama_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path / "llama"
    shutil.copytree(llama_dir, directory)
    words = ["<unk>", "<s>", "</s>", "user", "assistant", ":", "hello", "hi", "there"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=inner, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s> {{ m.role }} : {{ m.content }} </s> {% endfor %}"
    )
    fast.save_pretrained(str(directory))
    teacher = mmdistill.load_teacher(str(directory))
    ctx = DataContext(teacher.config, str(directory))
    convo = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [convo, {"image": "x.png", **convo}])
    source = open_source(path, ctx)
    # <s> user : hello </s> <s> assistant : hi </s>
    assert source.get(0).input_ids == [1, 3, 5, 6, 2, 1, 4, 5, 7, 2]
    with pytest.raises(DataError, match="text-only front-end"):
        source.get(1)


def test_shapes_dataset_is_built_once(tmp_path):
    spec = ShapesSpec(n_train=4, n_eval=2, text_lines=10)
    paths = shapes_dataset(spec, tmp_path)
    assert all(paths[k].exists() for k in ("train", "eval", "text"))
    assert paths["train"].parent.parent == tmp_path
    stamp = paths["manifest"].stat().st_mtime_ns
    assert shapes_dataset(spec, tmp_path) == paths
    assert paths["manifest"].stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------------------------
# Packing, order and position (with in-memory sources whose samples are known exactly)
# --------------------------------------------------------------------------------------------


class FakeSource:
    """Record i of source k is ``[1000 * k + i] * length(i)``; multimodal records carry a tile."""

    def __init__(self, k: int, lengths: list[int], multimodal: bool = False):
        self.k, self.lengths, self.multimodal = k, lengths, multimodal
        self.name = f"fake{k}"
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> Sample | None:
        ids = [1000 * self.k + i] * self.lengths[i]
        if not self.multimodal:
            return Sample(ids)
        return Sample(ids, torch.full((1, 3, 2, 2), float(1000 * self.k + i)), splittable=False)


def stream(sources, weights=None, seq_len=8, packing=True, seed=0):
    weights = weights or [1.0] * len(sources)
    return SequenceStream(sources, weights, seq_len, packing, seed, pad_token_id=-1)


def test_packing_splits_text_and_keeps_images_whole():
    text = FakeSource(0, [5, 5, 5])
    s = stream([text], seq_len=8)
    order = [int(i) for i in s.mixture._perm(0)]
    first, _ = s.next()
    second, _ = s.next()
    # documents concatenated in permutation order, the second cut across the sequences
    flat = [t for i in order for t in [i] * 5]
    assert first + second[:7] == flat[:15]
    images = FakeSource(1, [3, 4, 12])
    images.multimodal = True
    s = stream([images], seq_len=8)
    rows = [s.next() for _ in range(3)]
    for ids, pixels in rows:
        values = sorted(set(ids))
        assert len(ids) <= 8 and ids != []
        # every sample whose tokens are in the row brings exactly its own tile, whole
        assert sorted(int(p[0, 0, 0, 0]) for p in pixels) == values
        assert all(ids.count(v) == images.lengths[v - 1000] for v in values)
    assert 1002 not in {t for ids, _ in rows for t in ids}
    assert s.too_long["fake1"] >= 1  # the 12-token record never fits


def test_no_packing_truncates_text_and_pads():
    s = stream([FakeSource(0, [3, 20])], seq_len=8, packing=False)
    lengths = sorted(len(s.next()[0]) for _ in range(2))
    assert lengths == [3, 8]


def test_mixture_weights_and_epochs():
    mix = Mixture([10, 30], [3.0, 1.0], seed=5)
    draws = [mix.next() for _ in range(4000)]
    share = sum(1 for s, _ in draws if s == 0) / len(draws)
    assert abs(share - 0.75) < 0.03
    first = [i for s, i in draws if s == 0][:10]
    assert sorted(first) == list(range(10))  # an epoch visits every record once
    assert Mixture([10, 30], [3.0, 1.0], seed=5).next() == draws[0]
    other = Mixture([10, 30], [3.0, 1.0], seed=6)
    assert [other.next() for _ in range(20)] != draws[:20]
    # (data seed, stage) tuples: flat entropy (numpy 2 refuses nested sequences), distinct orders
    stage1, stage2 = Mixture([10], [1.0], seed=(0, 1)), Mixture([10], [1.0], seed=(0, 2))
    assert [stage1.next() for _ in range(10)] != [stage2.next() for _ in range(10)]
    assert Mixture([10], [1.0], seed=(0, 1)).next() == Mixture([10], [1.0], seed=[0, 1]).next()


def batches(iterator, n):
    return [next(iterator) for _ in range(n)]


def same(a, b) -> bool:
    pa, pb = a.pixel_values, b.pixel_values
    pixels = (pa is None and pb is None) or (
        pa is not None and pb is not None and torch.equal(pa, pb)
    )
    return (
        torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.attention_mask, b.attention_mask)
        and pixels
    )


def make_sources():
    return [FakeSource(0, [3, 9, 4, 6, 2]), FakeSource(1, [5, 2, 7], multimodal=True)]


def test_resume_position_is_exact():
    ref = BatchIterator(stream(make_sources(), [2.0, 1.0], seq_len=8), batch_size=2)
    expected = batches(ref, 12)
    it = BatchIterator(stream(make_sources(), [2.0, 1.0], seq_len=8), batch_size=2)
    batches(it, 5)
    state = json.loads(json.dumps(it.state_dict()))
    fresh = BatchIterator(stream(make_sources(), [2.0, 1.0], seq_len=8), batch_size=2)
    fresh.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(batches(fresh, 7), expected[5:], strict=True))


def test_ranks_split_the_global_stream():
    one = BatchIterator(stream(make_sources()), batch_size=4)
    ranks = [BatchIterator(stream(make_sources()), batch_size=2, rank=r, world=2) for r in (0, 1)]
    for _ in range(5):
        whole = next(one)
        parts = [next(r) for r in ranks]
        assert torch.equal(whole.input_ids, torch.cat([p.input_ids for p in parts]))
        tiles = [p.pixel_values for p in parts if p.pixel_values is not None]
        if whole.pixel_values is None:
            assert not tiles
        else:
            assert torch.equal(whole.pixel_values, torch.cat(tiles))


def test_batches_mask_padding():
    # two multimodal samples of 3 and 4 tokens fill 7 of every 8 positions; the 8th is padding
    it = BatchIterator(stream([FakeSource(1, [3, 4], multimodal=True)], seq_len=8), batch_size=2)
    batch = next(it)
    assert batch.attention_mask.tolist() == [[1] * 7 + [0]] * 2
    assert batch.input_ids[:, 7].tolist() == [-1, -1]
    assert sorted(batch.input_ids[0, :7].tolist()) == [1000] * 3 + [1001] * 4
    assert batch.tokens == 14 and batch.pixel_values.shape == (4, 3, 2, 2)


def test_real_data_iterator_is_deterministic(tmp_path, ctx):
    spec = ShapesSpec(n_train=8, n_eval=2, text_lines=20)
    shapes = shapes_dataset(spec, tmp_path)
    sources = [
        DataSource(source="builtin:shapes", weight=3),
        DataSource(source="builtin:shapes/text"),
    ]

    def run(seed):
        return batches(make_iterator(sources, ctx, shapes, 96, True, seed, 2), 3)

    a, b, c = run(0), run(0), run((0, 1))
    assert all(same(x, y) for x, y in zip(a, b, strict=True))
    assert not all(same(x, y) for x, y in zip(a, c, strict=True))
    assert any(x.pixel_values is not None for x in a)
