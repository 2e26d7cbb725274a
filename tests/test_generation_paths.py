"""The two decode paths of :func:`mmdistill.generate`: which one a request takes, the graph
path's sampling, stop tokens and streaming between steps (its step run without capture on CPU),
and the decoders kept on a model across calls (reused, keyed by task and batch, dropped when
the weights move). Greedy tokens of both paths against recomputation: generation_harness."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from conftest import make_omni_student

import mmdistill
from mmdistill.generation import generate, resolve_path


@pytest.fixture(scope="module")
def students(llama_teacher):
    return (
        mmdistill.seed(llama_teacher, attention_layers="none"),
        mmdistill.seed(llama_teacher, attention_layers="every:2"),
    )


def _prompt(rows=3, length=7, seed=0):
    return torch.randint(0, 101, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_the_path_a_request_takes(students, llama_teacher):
    linear, hybrid = students
    padded = torch.ones(2, 5, dtype=torch.long)
    padded[1, :2] = 0
    assert resolve_path(linear, "auto") == "eager"  # CPU
    assert resolve_path(hybrid, "graph") == "graph"
    assert resolve_path(linear, "graph", padded) == "graph"  # no attention: padding is fine
    assert resolve_path(hybrid, "auto", padded) == "eager"
    with pytest.raises(ValueError, match="left-padded prompts through attention"):
        resolve_path(hybrid, "graph", padded)
    windowed = copy.deepcopy(llama_teacher)
    windowed.config.stacks[0].sliding_window = 4
    assert resolve_path(windowed, "auto") == "eager"
    with pytest.raises(ValueError, match="sliding-window"):
        resolve_path(windowed, "graph")
    with pytest.raises(ValueError, match="auto, graph, eager"):
        resolve_path(linear, "fast")


@pytest.mark.parametrize("layout", [0, 1], ids=["linear", "hybrid"])
def test_graph_path_samples_with_a_seed_stops_and_streams(students, layout):
    model = students[layout]
    prompt = _prompt()
    kw = dict(max_new_tokens=9, do_sample=True, temperature=0.9, top_k=30, top_p=0.95)
    streamed = []

    def sample(path, seed, **more):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, generator=g, eos_token_id=[], decode=path, **kw, **more)

    collector = []  # off while the loop runs (no cycles there), as it was before afterwards
    one = sample(
        "graph", 5, streamer=lambda t: (streamed.append(t), collector.append(gc.isenabled()))
    )
    assert collector == [False] * 9 and gc.isenabled()
    assert torch.equal(one, sample("graph", 5))
    assert not torch.equal(one, sample("graph", 6))
    assert torch.equal(torch.stack(streamed, 1), one[:, prompt.shape[1] :])
    if layout == 0:  # the same arithmetic off CUDA: the same draws as the eager path
        assert torch.equal(one, sample("eager", 5))
    greedy = generate(model, prompt[:1], max_new_tokens=12, eos_token_id=[], decode="graph")
    new = greedy[0, prompt.shape[1] :].tolist()
    for stop in (new[2], new[10]):  # checked every STOP_CHECK steps, cut where it stopped
        for path in ("graph", "eager"):
            out = generate(model, prompt[:1], max_new_tokens=12, eos_token_id=stop, decode=path)
            assert torch.equal(out, greedy[:, : prompt.shape[1] + new.index(stop) + 1]), path


def test_rows_that_stop_early_are_padded_on_both_paths(students):
    _, hybrid = students
    prompt = _prompt(rows=2)
    free = generate(hybrid, prompt, max_new_tokens=6, eos_token_id=[], decode="eager")
    stop = int(free[0, prompt.shape[1] + 1])
    ends = (free[0, prompt.shape[1] :] == stop).nonzero()[0, 0] + prompt.shape[1]
    outs = [
        generate(hybrid, prompt, max_new_tokens=6, eos_token_id=stop, pad_token_id=0, decode=p)
        for p in ("eager", "graph")
    ]
    assert torch.equal(outs[0], outs[1])
    assert (outs[0][0, ends + 1 :] == 0).all() and outs[0].shape[1] > ends + 1


def test_decoders_are_kept_per_batch_grow_and_are_dropped_when_weights_move(llama_teacher):
    model = mmdistill.seed(llama_teacher, attention_layers="every:2")
    generate(model, _prompt(rows=2), max_new_tokens=3, decode="graph")
    kept = model.__dict__["_graph_decoders"]
    first = kept[(None, 2, False, "text")]
    assert first.cache.max_length == 256
    generate(model, _prompt(rows=2, seed=1), max_new_tokens=4, decode="graph")
    assert list(kept.values()) == [first]  # reused
    generate(model, _prompt(rows=1), max_new_tokens=3, decode="graph")
    assert sorted(k[1] for k in kept) == [1, 2]
    long = torch.randint(0, 101, (1, 300), generator=torch.Generator().manual_seed(2))
    generate(model, long, max_new_tokens=3, decode="graph")
    grown = kept[(None, 1, False, "text")]
    assert grown.cache.max_length == 512 and len(kept) == 2  # replaced, not added
    generate(model, _prompt(rows=1), max_new_tokens=3, decode="graph")
    assert kept[(None, 1, False, "text")] is grown  # a short request fits the larger cache
    assert not copy.deepcopy(model).__dict__["_graph_decoders"]
    model.double()
    out = generate(model, _prompt(rows=1), max_new_tokens=3, decode="graph", eos_token_id=[])
    assert len(kept) == 1 and next(iter(kept.values())).model is model
    ref = generate(model, _prompt(rows=1), max_new_tokens=3, decode="eager", eos_token_id=[])
    assert torch.equal(out, ref)


def test_each_task_gets_its_own_decoder(hovle):
    model = make_omni_student(hovle)
    prompt = _prompt(rows=1, length=6)
    outs = {}
    for task in ("mmu", "t2i", "mmu"):
        model.use_task(task)
        graph = generate(model, prompt, max_new_tokens=5, eos_token_id=[], decode="graph")
        eager = generate(model, prompt, max_new_tokens=5, eos_token_id=[], decode="eager")
        assert torch.equal(graph, eager), task
        outs[task] = graph
    assert sorted(k[0] for k in model.__dict__["_graph_decoders"]) == ["mmu", "t2i"]
    assert not torch.equal(outs["mmu"], outs["t2i"])  # the adapters differ
