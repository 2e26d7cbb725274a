"""LLaVA teachers (transformers' ``LlavaForConditionalGeneration``: CLIP or SigLIP vision tower,
projector, Llama or Qwen2 LM): converted students against transformers' own forward with an
image, the processor's preprocessing and image-token placement, the verification at load time,
and a hybrid distilled on image conversations that then answers about an image."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT_RECIPES, tiny_hf_kwargs, write_char_tokenizer

import mmdistill
from mmdistill.chat_format import build_generation_prompt
from mmdistill.data.synthetic import render_scene
from mmdistill.recipe import load_recipe
from mmdistill.tokenizer import load_tokenizer
from mmdistill.trainer import distill

VISION = {
    "clip": dict(model_type="clip_vision_model", projection_dim=32),
    "siglip": dict(model_type="siglip_vision_model"),
}


def write_llava(directory, vision: str = "clip", text: str = "llama", strategy="default"):
    """A random tiny LLaVA saved by transformers, with a character tokenizer holding <image>
    and the vision tower's own image processor; returns the transformers model."""
    from transformers import (
        AutoConfig,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipImageProcessor,
    )

    vocab = write_char_tokenizer(directory, extra_specials=("<image>",))
    vision_cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        **VISION[vision],
    )
    kind = vision_cfg.pop("model_type")
    text_cfg = tiny_hf_kwargs(vocab_size=vocab, num_hidden_layers=4, eos_token_id=2)
    config = LlavaConfig(
        vision_config=AutoConfig.for_model(kind, **vision_cfg),
        text_config=AutoConfig.for_model(text, **text_cfg),
        image_token_id=vocab - 1,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(directory))
    processor = CLIPImageProcessor if vision == "clip" else SiglipImageProcessor
    processor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(str(directory))
    return model


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava")
    return directory, write_llava(directory)


def picture(path):
    shapes = [{"shape": "circle", "colour": "red", "bbox": [4, 4, 20, 20]}]
    render_scene(shapes, 48).save(path)
    return path


@pytest.mark.parametrize(
    "vision,text,strategy",
    [("clip", "llama", "default"), ("siglip", "qwen2", "full"), ("clip", "qwen2", "full")],
)
def test_all_student_equals_transformers_with_an_image(tmp_path, vision, text, strategy):
    hf_model = write_llava(tmp_path, vision, text, strategy)
    teacher = mmdistill.load_teacher(str(tmp_path))
    assert teacher.config.teacher["verified"]["max_abs_diff"] <= 1e-4
    student = mmdistill.seed(teacher, attention_layers="all")
    tokenizer = load_tokenizer(str(tmp_path))
    ids, pixels, _ = build_generation_prompt(
        student, tokenizer, "<image>\nWhat is it?", [picture(tmp_path / "a.png")]
    )
    ids = torch.tensor([ids])
    assert (
        int((ids == hf_model.config.image_token_id).sum())
        == teacher.config.front_end["num_image_token"]
    )
    with torch.no_grad():
        ours = student(ids, pixel_values=pixels).logits
        theirs = hf_model(input_ids=ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()


def test_the_processor_preprocesses_the_images(llava, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    directory, _ = llava
    teacher = mmdistill.load_teacher(str(directory), verify=False)
    path = picture(tmp_path / "a.png")
    _, pixels, _ = build_generation_prompt(
        teacher, load_tokenizer(str(directory)), "<image> Hi", [path]
    )
    expected = AutoImageProcessor.from_pretrained(str(directory))(
        images=[Image.open(path).convert("RGB")], return_tensors="pt"
    )["pixel_values"]
    assert torch.equal(pixels, expected)


def test_a_planted_front_end_bug_is_caught_at_load_time(llava, monkeypatch):
    from mmdistill.errors import TeacherError
    from mmdistill.teachers import llava as adapter

    directory, _ = llava
    monkeypatch.setattr(adapter, "FRONT", adapter.FRONT.replace("(vision_tower|", "(vision_towe|"))
    with pytest.raises(TeacherError, match="not understood"):
        mmdistill.load_teacher(str(directory))


def test_a_hybrid_distils_on_image_conversations_and_answers(llava, tmp_path):
    directory, _ = llava
    recipe = load_recipe(
        ROOT_RECIPES / "tiny.yaml",
        [
            f"teacher={directory}",
            "student.attention_layers=every:2",
            f"output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.shapes={n_train: 16, n_eval: 4, image_size: 32}",
            "data.train=[{source: builtin:shapes}]",
            "data.seq_len=1024",
            "logging.progress=false",
            "checkpoint={every: 0, keep: 1}",
            "stages.0.steps=2",
            "stages.1.steps=2",
            "stages.2.steps=2",
        ],
    )
    report = distill(recipe)
    assert all(s["final_loss"] == s["final_loss"] for s in report["stages"])  # finite
    student = mmdistill.load_student(report["student_dir"])
    assert student.config.front_end["type"] == "llava"
    assert student.config.layer_types == ["attention", "mamba"] * 2
    ids, pixels, stops = build_generation_prompt(
        student,
        load_tokenizer(report["student_dir"]),
        "<image>\nWhat is it?",
        [picture(tmp_path / "a.png")],
    )
    prompt = torch.tensor([ids])
    cached = mmdistill.generate(student, prompt, max_new_tokens=6, pixel_values=pixels)
    new = cached[0, prompt.shape[1] :]
    assert len(new) > 0
    with torch.no_grad():  # the cache gives what recomputing the whole sequence gives
        logits = student(cached, pixel_values=pixels).logits[0, prompt.shape[1] - 1 : -1]
    assert torch.equal(logits.argmax(-1), new)


def test_internvl_is_refused_with_its_reason(tmp_path):
    import json

    from mmdistill.errors import TeacherError

    config = {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherError, match="tiles each image into crops"):
        mmdistill.load_teacher(str(tmp_path))
