"""The t2i graph step run eagerly on CPU (``capture=False``: the same step a CUDA graph captures)
gives the codes of ``generate_codes``; a one-row prompt replicated to a batch gives that row's
image in every row; the decoder stops at the last code and refuses another task."""

from __future__ import annotations

import pytest
import torch
from conftest import make_omni_student

from mmdistill.cached_forward import prefill
from mmdistill.data.t2i import t2i_prompt
from mmdistill.model import LMCache
from mmdistill.t2i_generation import generate_codes
from mmdistill.t2i_graph import ImageGraphDecoder

CAPTIONS = [[20, 31, 42], [50, 61, 70]]  # equal lengths: no padding


def _student(hovle, mode="decoupled"):
    """A tiny omni student with 16 codes per image whose position embeddings weigh enough for
    the codes to depend on them (so a wrong position counter cannot hide)."""
    model = make_omni_student(hovle, mode=mode, shared_lora=mode == "shared", grid=4)
    with torch.no_grad():
        model.image_vocab.position.weight.mul_(10.0)
    return model


def _prompts(model, captions) -> torch.Tensor:
    return torch.tensor([t2i_prompt(model.image_vocab.spec, c) for c in captions])


def _decoder(model, batch, prompt_length) -> ImageGraphDecoder:
    codes = model.image_vocab.spec.codes_per_image
    return ImageGraphDecoder(model, batch, max_length=prompt_length + codes, capture=False)


@pytest.mark.parametrize("mode", ["decoupled", "shared"])
def test_eager_graph_step_gives_the_codes_of_generate_codes(hovle, mode):
    model = _student(hovle, mode)
    ids = _prompts(model, CAPTIONS)
    decoder = _decoder(model, len(CAPTIONS), ids.shape[1])
    with torch.no_grad():
        got = decoder.generate(decoder.prefill(ids))
    want = generate_codes(model, CAPTIONS)
    assert torch.equal(got.codes, want.codes) and got.crossed == want.crossed


def test_replicated_prompt_and_the_decoders_limits(hovle):
    model = _student(hovle)
    ids = _prompts(model, CAPTIONS[:1])
    decoder = _decoder(model, 3, ids.shape[1])
    one = LMCache(model, 1, model.device, model.dtype)
    with torch.no_grad():
        logits = prefill(model, one, ids, head="image")
        decoder.load_cache(one)
        out = decoder.generate(logits)
        with pytest.raises(ValueError, match="codes of this image are out"):
            decoder.replay()
    want = generate_codes(model, CAPTIONS[:1]).codes
    assert torch.equal(out.codes, want.expand_as(out.codes))
    decoder.start(logits)
    model.use_task("mmu")
    with pytest.raises(ValueError, match="captured for task 't2i'"):
        decoder.replay()


def test_image_codes_takes_the_graph_path_where_it_can(hovle):
    """``image_codes``: the captured step (run eagerly on CPU) gives the reference loop's codes,
    for a hybrid with captions of equal length and a linear student with padded ones; sampling,
    guidance and padding through attention take the reference loop (an error when the graph
    path is forced)."""
    from mmdistill import seed
    from mmdistill.image_vocab import ImageVocabSpec
    from mmdistill.omni_student import add_image_vocabulary
    from mmdistill.t2i_evaluation import image_codes, image_decode_path
    from mmdistill.t2i_generation import Sampling
    from mmdistill.task_lora import LoraSpec

    hybrid = _student(hovle)
    linear = seed(hovle, attention_layers="none", seed=0).float()
    spec = ImageVocabSpec(linear.config.vocab_size, 32, 4, embed_dim=16)
    linear = add_image_vocabulary(linear, spec, LoraSpec(dropout=0.0), seed=1).eval()
    padded = [[20, 31, 42], [50, 61]]
    graph, eager = Sampling(decode="graph"), Sampling(decode="eager")
    for model, captions in ((hybrid, CAPTIONS), (linear, padded)):
        assert image_decode_path(model, captions, Sampling()) == "eager"  # CPU
        got = image_codes(model, captions, graph)
        assert torch.equal(got.codes, image_codes(model, captions, eager).codes)
        kept = dict(model.__dict__["_graph_decoders"])
        assert [k[3] for k in kept] == ["image"]
        again = image_codes(model, captions, graph)  # the next batch reuses the decoder
        assert model.__dict__["_graph_decoders"] == kept and torch.equal(again.codes, got.codes)
    assert image_decode_path(hybrid, padded, Sampling(decode="auto")) == "eager"
    for sampling, captions in (
        (Sampling(decode="graph", cfg_scale=2.0), CAPTIONS),
        (Sampling(decode="graph", temperature=1.0), CAPTIONS),
        (graph, padded),
    ):
        with pytest.raises(ValueError, match="captured decode step does not support"):
            image_decode_path(hybrid, captions, sampling)
