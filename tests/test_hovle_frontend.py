"""Tests of HoVLE's vision front-end, image preprocessing, prompts and the tiny checkpoint fixture.

Every numeric check compares against an independent computation written differently from the
implementation (explicit loops, unfold instead of Conv2d, a hand-written bicubic kernel).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file

from mmdistill.frontends.hovle_image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_chat_prompt,
    candidate_grids,
    dynamic_preprocess,
    expand_image_placeholders,
    image_to_tensor,
    load_image,
    render_chat,
)
from mmdistill.frontends.hovle_vision import (
    HoVLEVisionConfig,
    HoVLEVisionFrontEnd,
    embed_text,
    extract_front_end_state,
    merge_image_features,
    num_image_tokens,
    pixel_shuffle,
)
from mmdistill.teachers.hovle_export import pack_wqkv_grouped
from mmdistill.teachers.tiny_hovle import write_tiny_hovle

# ----------------------------------------------------------------------------- pixel shuffle


def test_pixel_shuffle_matches_hand_computation() -> None:
    g, c = 4, 2
    # token t = row * g + col, value = 100 * row + 10 * col + channel
    x = torch.tensor(
        [[[100.0 * r + 10.0 * q + ch for ch in range(c)] for r in range(g) for q in range(g)]]
    )
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (1, 4, 4 * c)
    for i in range(2):
        for j in range(2):
            expected = []
            for dy in range(2):
                for dx in range(2):
                    r, q = 2 * i + dy, 2 * j + dx
                    expected += [100.0 * r + 10.0 * q + ch for ch in range(c)]
            assert out[0, i * 2 + j].tolist() == expected
    # v1 keeps the features but orders the output grid column-major
    v1 = pixel_shuffle(x, 0.5, "v1")
    for i in range(2):
        for j in range(2):
            assert torch.equal(v1[0, j * 2 + i], out[0, i * 2 + j])


def test_pixel_shuffle_ratio_quarter_and_errors() -> None:
    x = torch.randn(2, 64, 3)
    out = pixel_shuffle(x, 0.25)
    grid = x.view(2, 8, 8, 3)
    # token (1, 0) of the 2x2 output = rows 4..7, cols 0..3, row-major, channels innermost
    assert torch.equal(out[:, 2], grid[:, 4:8, 0:4].reshape(2, -1))
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(torch.randn(1, 12, 3))
    with pytest.raises(ValueError, match="ps_version"):
        pixel_shuffle(x, 0.5, "v3")


# ----------------------------------------------------------------------------- front-end


def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Resampling matrix [n_out, n_in]: align_corners=False, borders clamped."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        base = math.floor(src)
        for tap in range(-1, 3):
            m[o, min(max(base + tap, 0), n_in - 1)] += _cubic(src - (base + tap))
    return m


def _reference_image_features(front: HoVLEVisionFrontEnd, pixels: torch.Tensor) -> torch.Tensor:
    """Unfold patches, hand bicubic position table, 6-D space-to-depth, explicit MLP."""
    cfg = front.config
    p, d = cfg.patch_size, cfg.hidden_size
    sd = {k: v.double() for k, v in front.state_dict().items()}
    n, _, height, width = pixels.shape
    gh, gw = height // p, width // p
    cols = torch.nn.functional.unfold(pixels.double(), kernel_size=p, stride=p)  # [n, 3pp, L]
    w = sd["vision_embeddings.patch_embedding.weight"].reshape(d, -1)
    tokens = cols.transpose(1, 2) @ w.T + sd["vision_embeddings.patch_embedding.bias"]
    s = cfg.image_size // p
    table = sd["vision_embeddings.position_embedding"][0, 1:].reshape(s, s, d)
    rows, colm = _bicubic_matrix(s, gh), _bicubic_matrix(s, gw)
    table = torch.einsum("ya,xb,abd->yxd", rows, colm, table).reshape(gh * gw, d)
    tokens = tokens + table
    k = cfg.shuffle_factor
    x = tokens.reshape(n, gh // k, k, gw // k, k, d).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, (gh // k) * (gw // k), k * k * d)
    hidden = x @ sd["pixel_shuffle_proj.0.weight"].T + sd["pixel_shuffle_proj.0.bias"]
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return hidden @ sd["pixel_shuffle_proj.2.weight"].T + sd["pixel_shuffle_proj.2.bias"]


def _random_front_end(seed: int = 0, **overrides: object) -> HoVLEVisionFrontEnd:
    cfg = dict(hidden_size=16, llm_vocab_size=50, image_size=56, patch_size=14)
    cfg.update(overrides)
    front = HoVLEVisionFrontEnd(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in front.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return front.double()


def test_image_features_match_reference_at_trained_size() -> None:
    front = _random_front_end()
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    out = front.image_features(pixels.double())
    assert out.shape == (3, front.num_image_token, 16)
    assert front.num_image_token == 4
    torch.testing.assert_close(out, _reference_image_features(front, pixels), atol=1e-10, rtol=0)


def test_image_features_interpolate_position_table_for_other_sizes() -> None:
    front = _random_front_end(seed=2)
    pixels = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(3))
    out = front.image_features(pixels.double())
    assert out.shape == (2, 9, 16)
    # HoVLE resamples the table in float32 even for a float64 model, hence the tolerance.
    torch.testing.assert_close(out, _reference_image_features(front, pixels), atol=1e-5, rtol=0)


def test_class_token_is_not_used() -> None:
    front = _random_front_end(seed=4)
    pixels = torch.randn(1, 3, 56, 56, dtype=torch.float64)
    before = front.image_features(pixels)
    with torch.no_grad():
        front.vision_embeddings.class_embedding.add_(100.0)
        front.vision_embeddings.position_embedding[:, 0].add_(100.0)
    torch.testing.assert_close(front.image_features(pixels), before, atol=0, rtol=0)


def test_front_end_rejects_bad_inputs() -> None:
    front = _random_front_end()
    with pytest.raises(ValueError, match="multiple of patch"):
        front.image_features(torch.zeros(1, 3, 50, 56, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        front.image_features(torch.zeros(3, 56, 56, dtype=torch.float64))
    with pytest.raises(ValueError, match="post"):
        HoVLEVisionFrontEnd(dict(hidden_size=8, llm_vocab_size=4, pixel_shuffle_loc="post"))
    with pytest.raises(ValueError, match="downsample_ratio"):
        HoVLEVisionConfig(hidden_size=8, llm_vocab_size=4, downsample_ratio=0.4)


def test_num_image_tokens_formula() -> None:
    assert num_image_tokens(448, 14, 0.5) == 256
    assert num_image_tokens(56, 14, 0.5) == 4


# ----------------------------------------------------------------------------- text + merge


def test_embed_text_uses_special_table_for_high_ids() -> None:
    table = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
    special = -torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3) - 1
    ids = torch.tensor([[0, 4, 5, 6, 2]])
    out = embed_text(ids, table, special)
    expected = torch.stack([table[0], table[4], special[0], special[1], table[2]])[None]
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        embed_text(torch.tensor([7]), table, special)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        embed_text(torch.tensor([5]), table)


def test_merge_fills_image_positions_in_order() -> None:
    ctx = 9
    ids = torch.tensor([[1, ctx, ctx, 2, ctx], [ctx, 3, ctx, ctx, 4]])
    embeds = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    feats = 1000 + torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2)
    out = merge_image_features(embeds, ids, feats, ctx)
    expected = embeds.clone()
    flat = feats.reshape(-1, 2)
    slot = 0
    for b in range(2):
        for t in range(5):
            if ids[b, t] == ctx:
                expected[b, t] = flat[slot]
                slot += 1
    assert torch.equal(out, expected)
    assert embeds[0, 1, 0] == 2.0  # input untouched


def test_merge_count_mismatch_raises() -> None:
    ids = torch.tensor([[9, 9, 1]])
    with pytest.raises(ValueError, match="2 image-context tokens.*provide 4"):
        merge_image_features(torch.zeros(1, 3, 2), ids, torch.zeros(2, 2, 2), 9)


def test_embed_inputs_combines_text_and_images() -> None:
    front = _random_front_end(seed=5, img_context_token_id=7)
    pixels = torch.randn(1, 3, 56, 56, dtype=torch.float64)
    ids = torch.tensor([[1, 3, 7, 7, 7, 7, 4, 2]])
    out = front.embed_inputs(ids, pixels)
    table = front.llm_text_embeddings.weight
    feats = front.image_features(pixels)[0]
    torch.testing.assert_close(out[0, 2:6], feats, atol=0, rtol=0)
    torch.testing.assert_close(out[0, [0, 1, 6, 7]], table[[1, 3, 4, 2]], atol=0, rtol=0)


# ----------------------------------------------------------------------------- tiling


def _solid(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def _normalised(color: tuple[int, int, int]) -> torch.Tensor:
    """ImageNet-normalised colour, computed in float64 (so compare with atol 1e-6)."""
    return torch.tensor(
        [(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD, strict=True)],
        dtype=torch.float32,
    )


@pytest.mark.parametrize(
    ("size", "max_num", "min_num", "grid"),
    [
        ((448, 448), 12, 1, (1, 1)),
        ((800, 400), 12, 1, (2, 1)),
        ((400, 800), 12, 1, (1, 2)),
        ((1000, 300), 6, 1, (3, 1)),
        ((448, 448), 4, 2, (2, 2)),
        ((672, 448), 2, 1, (2, 1)),  # tie with (1, 1): large image takes the bigger grid
        ((150, 100), 2, 1, (1, 1)),  # same tie, small image keeps (1, 1)
    ],
)
def test_tiling_grids(
    size: tuple[int, int], max_num: int, min_num: int, grid: tuple[int, int]
) -> None:
    tiles = dynamic_preprocess(_solid(*size, (10, 20, 30)), min_num, max_num, 448, True)
    blocks = grid[0] * grid[1]
    assert len(tiles) == blocks + (1 if blocks > 1 else 0)
    assert all(t.size == (448, 448) for t in tiles)


def test_candidate_grids_cover_limits() -> None:
    grids = candidate_grids(1, 6)
    areas = [c * r for c, r in grids]
    assert areas == sorted(areas)
    assert set(grids) == {(c, r) for c in range(1, 7) for r in range(1, 7) if c * r <= 6}
    with pytest.raises(ValueError, match="min_num"):
        candidate_grids(3, 2)


def test_tiles_are_cut_row_major_and_thumbnail_last() -> None:
    image = Image.new("RGB", (56, 28))
    image.paste((255, 0, 0), (0, 0, 28, 28))
    image.paste((0, 0, 255), (28, 0, 56, 28))
    pixels = load_image(image, input_size=28, max_num=4)
    assert pixels.shape == (3, 3, 28, 28)
    red, blue = _normalised((255, 0, 0)), _normalised((0, 0, 255))
    torch.testing.assert_close(pixels[0], red.view(3, 1, 1).expand(3, 28, 28), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[1], blue.view(3, 1, 1).expand(3, 28, 28), atol=1e-6, rtol=0)
    # thumbnail: the whole image squeezed; far-left red, far-right blue
    torch.testing.assert_close(pixels[2, :, 14, 0], red, atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[2, :, 14, 27], blue, atol=1e-6, rtol=0)


def test_no_thumbnail_and_non_dynamic() -> None:
    image = _solid(900, 300, (1, 2, 3))
    assert load_image(image, 448, max_num=12, use_thumbnail=False).shape[0] == 3
    single = load_image(image, 448, dynamic=False)
    assert single.shape == (1, 3, 448, 448)
    torch.testing.assert_close(single[0, :, 5, 5], _normalised((1, 2, 3)), atol=1e-6, rtol=0)


def test_image_to_tensor_values() -> None:
    arr = np.array([[[0, 128, 255], [10, 20, 30]], [[255, 255, 255], [1, 2, 3]]], np.uint8)
    out = image_to_tensor(Image.fromarray(arr), 2)
    for y in range(2):
        for x in range(2):
            torch.testing.assert_close(
                out[:, y, x], _normalised(tuple(int(v) for v in arr[y, x])), atol=1e-6, rtol=0
            )


def test_load_image_from_path_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    _solid(30, 30, (200, 100, 50)).save(path)
    pixels = load_image(path, input_size=28)
    torch.testing.assert_close(pixels[0, :, 3, 3], _normalised((200, 100, 50)), atol=1e-6, rtol=0)
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(broken)


# ----------------------------------------------------------------------------- prompts


def test_render_chat_internlm2() -> None:
    text = render_chat(
        [
            {"role": "system", "content": "SYS"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
        ]
    )
    assert text == (
        "<|im_start|>system\nSYS<|im_end|>"
        "<|im_start|>user\nQ1<|im_end|>"
        "<|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|>"
        "<|im_start|>assistant\n"
    )
    default = render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert default.startswith("<|im_start|>system\n你是由上海人工智能实验室")
    assert default.endswith("<|im_end|><|im_start|>user\nHi<|im_end|>")
    with pytest.raises(ValueError, match="unknown chat template"):
        render_chat([{"role": "user", "content": "x"}], "vicuna")
    with pytest.raises(ValueError, match="expected a user turn"):
        render_chat([{"role": "assistant", "content": "x"}])


def test_expand_placeholders_and_chat_prompt() -> None:
    out = expand_image_placeholders("a <image> b <image>", [2, 1], 3)
    ctx = "<IMG_CONTEXT>"
    assert out == f"a <img>{ctx * 6}</img> b <img>{ctx * 3}</img>"
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        expand_image_placeholders("<image>", [1, 1], 3)
    prompt = build_chat_prompt("What?", [2], 2, system_message="S")
    assert prompt == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\n"
        f"<img>{ctx * 4}</img>\nWhat?<|im_end|><|im_start|>assistant\n"
    )
    assert "<img>" not in build_chat_prompt("Hi", [], 256)


# ----------------------------------------------------------------------------- fixture


def test_pack_wqkv_grouped_layout() -> None:
    hd, hidden, kv, q_per_kv = 2, 3, 2, 2
    q = torch.arange(kv * q_per_kv * hd * hidden, dtype=torch.float32).reshape(-1, hidden)
    k = -1 - torch.arange(kv * hd * hidden, dtype=torch.float32).reshape(-1, hidden)
    v = 1000 + torch.arange(kv * hd * hidden, dtype=torch.float32).reshape(-1, hidden)
    fused = pack_wqkv_grouped(q, k, v, kv)
    expected = []
    for g in range(kv):
        for j in range(q_per_kv):
            head = g * q_per_kv + j
            expected.append(q[head * hd : (head + 1) * hd])
        expected.append(k[g * hd : (g + 1) * hd])
        expected.append(v[g * hd : (g + 1) * hd])
    assert torch.equal(fused, torch.cat(expected))


def test_fixture_layout_and_front_end_loading(tmp_path: Path) -> None:
    info = write_tiny_hovle(tmp_path / "hovle", seed=0)
    root = Path(info["path"])
    config = json.loads((root / "config.json").read_text())
    assert config["model_type"] == "internvl_chat"
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["embedding_config"]["model_type"] == "holistic_embedding"
    assert config["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    for key in (
        "downsample_ratio",
        "force_image_size",
        "template",
        "ps_version",
        "dynamic_image_size",
        "use_thumbnail",
        "min_dynamic_patch",
        "max_dynamic_patch",
    ):
        assert key in config
    emb = config["embedding_config"]
    tensors = load_file(str(root / "model.safetensors"))
    h, heads, kv, hd = 64, 4, 2, 16
    assert tensors["embedding_model.encoder.1.attention.wqkv.weight"].shape == (
        (heads + 2 * kv) * hd,
        h,
    )
    assert tensors["language_model.model.layers.1.attention.wo.weight"].shape == (h, heads * hd)
    assert tensors["language_model.output.weight"].shape == (info["vocab_size"], h)
    assert tensors["language_model.model.tok_embeddings.weight"].shape == (info["vocab_size"], h)
    assert tensors["language_model.model.norm.weight"].shape == (h,)
    assert tensors["embedding_model.vision_embeddings.position_embedding"].shape == (1, 17, h)
    assert tensors["embedding_model.pixel_shuffle_proj.0.weight"].shape == (h, 4 * h)
    assert not any(k.startswith("embedding_model.norm") for k in tensors)

    front = HoVLEVisionFrontEnd(
        HoVLEVisionConfig.from_embedding_config(emb, config["force_image_size"])
    )
    front.load_state_dict(extract_front_end_state(tensors), strict=True)
    assert front.num_image_token == info["num_image_token"] == 4
    assert front.config.img_context_token_id == info["img_context_token_id"]
    with pytest.raises(KeyError, match="unmapped"):
        extract_front_end_state({**tensors, "embedding_model.mystery.weight": torch.zeros(1)})

    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    assert sp.get_piece_size() == emb["llm_vocab_size"]
    ids = sp.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img>")
    assert ids.count(info["img_context_token_id"]) == 2
    for token in ("<img>", "</img>", "<|im_start|>", "<|im_end|>"):
        assert sp.id_to_piece(sp.piece_to_id(token)) == token
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    tok_cfg = json.loads((root / "tokenizer_config.json").read_text())
    assert tok_cfg["added_tokens_decoder"][str(info["img_context_token_id"])]["content"] == (
        "<IMG_CONTEXT>"
    )


def test_fixture_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = write_tiny_hovle(tmp_path / "a", seed=3)
    b = write_tiny_hovle(tmp_path / "b", seed=3)
    c = write_tiny_hovle(tmp_path / "c", seed=4)
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        assert (Path(a["path"]) / name).read_bytes() == (Path(b["path"]) / name).read_bytes()
    wa = load_file(str(Path(a["path"]) / "model.safetensors"))
    wc = load_file(str(Path(c["path"]) / "model.safetensors"))
    assert not torch.equal(wa["language_model.output.weight"], wc["language_model.output.weight"])


def test_fixture_special_text_embeddings(tmp_path: Path) -> None:
    info = write_tiny_hovle(tmp_path / "s", num_special_text_tokens=3, num_llm_layers=1)
    tensors = load_file(str(Path(info["path"]) / "model.safetensors"))
    config = json.loads((Path(info["path"]) / "config.json").read_text())
    emb = config["embedding_config"]
    assert tensors["embedding_model.special_text_embeddings.weight"].shape == (3, 64)
    assert config["llm_config"]["vocab_size"] == emb["llm_vocab_size"] + 3
    front = HoVLEVisionFrontEnd(HoVLEVisionConfig.from_embedding_config(emb))
    front.load_state_dict(extract_front_end_state(tensors), strict=True)
    high = emb["llm_vocab_size"] + 1
    out = front.text_embeddings(torch.tensor([[high]]))
    assert torch.equal(out[0, 0], tensors["embedding_model.special_text_embeddings.weight"][1])
    with pytest.raises(TypeError, match="unknown size"):
        write_tiny_hovle(tmp_path / "x", hidden=3)
