"""The image tokenizer: LlamaGen's VQ architecture and key names, quantisation, strict loading,
pixels, and the shipped shapes VQ."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmdistill.data.synthetic import BACKGROUND, COLOURS, generate_samples
from mmdistill.errors import CheckpointError
from mmdistill.image_tokenizer import (
    LLAMAGEN_VQ16,
    ImageTokenizer,
    VQConfig,
    VQModel,
    images_to_tensor,
    load_image_tokenizer,
    palette_agreement,
    tensor_to_images,
    tensor_to_uint8,
)

TINY = VQConfig(
    codebook_size=64,
    codebook_embed_dim=4,
    z_channels=32,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    image_size=16,
)


@pytest.fixture(scope="module")
def tiny_model() -> VQModel:
    torch.manual_seed(0)
    return VQModel(TINY).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def llamagen_state(model: VQModel) -> dict[str, torch.Tensor]:
    """A state dict as LlamaGen saves it: our keys plus its codebook-usage buffer."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["quantize.codebook_used"] = torch.zeros(65536)
    return state


# --- the architecture ------------------------------------------------------------------------


def test_vq16_has_llamagen_key_names_and_shapes():
    with torch.device("meta"):
        model = VQModel(LLAMAGEN_VQ16)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {  # from LlamaGen's tokenizer/tokenizer_image/vq_model.py, VQ-16
        "encoder.conv_in.weight": [128, 3, 3, 3],
        "encoder.conv_blocks.0.res.0.norm1.weight": [128],
        "encoder.conv_blocks.0.downsample.conv.weight": [128, 128, 3, 3],
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": [256, 128, 1, 1],
        "encoder.conv_blocks.4.attn.1.q.weight": [512, 512, 1, 1],
        "encoder.mid.1.proj_out.weight": [512, 512, 1, 1],
        "encoder.mid.2.conv2.weight": [512, 512, 3, 3],
        "encoder.conv_out.weight": [256, 512, 3, 3],
        "quant_conv.weight": [8, 256, 1, 1],
        "quantize.embedding.weight": [16384, 8],
        "post_quant_conv.weight": [256, 8, 1, 1],
        "decoder.conv_in.weight": [512, 256, 3, 3],
        "decoder.conv_blocks.0.res.2.conv2.weight": [512, 512, 3, 3],
        "decoder.conv_blocks.0.attn.2.v.weight": [512, 512, 1, 1],
        "decoder.conv_blocks.0.upsample.conv.weight": [512, 512, 3, 3],
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": [256, 512, 1, 1],
        "decoder.conv_blocks.4.res.2.conv1.weight": [128, 128, 3, 3],
        "decoder.norm_out.weight": [128],
        "decoder.conv_out.weight": [3, 128, 3, 3],
    }
    assert {k: shapes.get(k) for k in expected} == expected
    # the last encoder level does not downsample, the last decoder level does not upsample;
    # attention only at the lowest resolution (2 in the encoder, 3 in the decoder)
    assert not any(
        k.startswith(("encoder.conv_blocks.4.downsample", "decoder.conv_blocks.4.up"))
        for k in shapes
    )
    attn = {k.split(".attn.")[0] + f".{k.split('.attn.')[1][0]}" for k in shapes if ".attn." in k}
    assert attn == {"encoder.conv_blocks.4.0", "encoder.conv_blocks.4.1"} | {
        f"decoder.conv_blocks.0.{j}" for j in range(3)
    }
    assert (LLAMAGEN_VQ16.downsample, LLAMAGEN_VQ16.grid) == (16, 16)


def test_vq16_layout_encodes_256px_to_16x16_codes():
    config = VQConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32)
    torch.manual_seed(0)
    model = VQModel(config).eval()
    with torch.no_grad():
        codes = model.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
        assert codes.shape == (1, 16, 16) and codes.dtype == torch.long
        assert 0 <= int(codes.min()) and int(codes.max()) < 16384
        out = model.decode(codes)
    assert out.shape == (1, 3, 256, 256) and out.abs().max() <= 1.0


def test_config_round_trips_and_rejects_unknown_keys():
    assert VQConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    with pytest.raises(ValueError, match="unknown VQConfig key.*entropy_loss_ratio"):
        VQConfig.from_dict({**TINY.to_dict(), "entropy_loss_ratio": 0.0})
    with pytest.raises(ValueError, match="multiple of 32"):
        VQConfig(ch=16)


# --- quantisation ----------------------------------------------------------------------------


def test_quantisation_is_the_nearest_normalised_code(tiny_model):
    z = torch.randn(2, TINY.codebook_embed_dim, 5, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z_q, codes, losses = tiny_model.quantize(z)
    vectors = z.double().permute(0, 2, 3, 1).reshape(-1, TINY.codebook_embed_dim)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    book = tiny_model.quantize.embedding.weight.detach().double()
    book = book / book.norm(dim=1, keepdim=True)
    distances = ((vectors[:, None, :] - book[None, :, :]) ** 2).sum(-1)
    assert torch.equal(codes.flatten(), distances.argmin(1))
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 4).double(), book[codes.flatten()])
    expected = distances.min(1).values.mean() / TINY.codebook_embed_dim
    assert float(losses["codebook"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(losses["commitment"]) == pytest.approx(0.25 * float(expected), rel=1e-5)


def test_training_pass_has_straight_through_gradients(images):
    torch.manual_seed(0)
    model = VQModel(TINY).train()
    recon, codes, losses = model(images)
    assert recon.shape == images.shape and codes.shape == (3, 8, 8)
    ((recon - images).pow(2).mean() + losses["codebook"] + losses["commitment"]).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the quantiser
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_llamagen_checkpoint_round_trips(tmp_path, tiny_model, images, fmt):
    state = llamagen_state(tiny_model)
    path = tmp_path / f"vq.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:  # LlamaGen's training checkpoint layout
        torch.save({"model": state, "steps": 5, "args": argparse.Namespace(lr=1e-4)}, path)
    tok = load_image_tokenizer(path, config=TINY)
    assert not tok.model.training and not any(p.requires_grad for p in tok.model.parameters())
    loaded = tok.model.state_dict()
    assert loaded.keys() == tiny_model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_model.state_dict().items())
    with torch.no_grad():
        codes = tiny_model.encode(images)
        assert torch.equal(tok.model.encode(images), codes)
        assert torch.equal(tok.model.decode(codes), tiny_model.decode(codes))


def test_saved_directory_round_trips_with_its_digest(tmp_path, tiny_model, images):
    tok = ImageTokenizer(tiny_model, source="test")
    tok.save(tmp_path / "tok")
    record = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert record["kind"] == "vq" and record["config"] == TINY.to_dict()
    again = load_image_tokenizer(tmp_path / "tok")
    assert again.config == TINY and again.digest == tok.digest and len(tok.digest) == 16
    pictures = tensor_to_images(images)
    assert torch.equal(again.encode_images(pictures), tok.encode_images(pictures))
    with pytest.raises(CheckpointError, match="carries its own"):
        load_image_tokenizer(tmp_path / "tok", config=LLAMAGEN_VQ16)
    other = VQModel(TINY)
    assert ImageTokenizer(other).digest != tok.digest


def test_wrong_shape_missing_and_unexpected_keys_are_named(tmp_path, tiny_model):
    state = llamagen_state(tiny_model)
    state["quantize.embedding.weight"] = torch.zeros(32, 4)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_image_tokenizer(path, config=TINY)
    message = str(err.value)
    assert str(path) in message and "quantize.embedding.weight" in message
    assert "expected shape [64, 4], got [32, 4]" in message and "VQConfig(" in message
    state = llamagen_state(tiny_model)
    del state["decoder.conv_out.bias"]
    state["encoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(
        CheckpointError,
        match=r"missing key\(s\) decoder\.conv_out\.bias.*"
        r"unexpected key\(s\) encoder\.extra\.weight",
    ):
        load_image_tokenizer(path, config=TINY)
    with pytest.raises(CheckpointError, match="does not fit"):  # VQ-16 sizes by default
        load_image_tokenizer(path)


def test_unusable_sources_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_image_tokenizer(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="does not download"):
        load_image_tokenizer("FoundationVision/LlamaGen")
    with pytest.raises(CheckpointError, match="unknown built-in"):
        load_image_tokenizer("builtin:nope")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_image_tokenizer(garbage)
    torch.save({"model": {"a": 1}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_image_tokenizer(tmp_path / "odd.pt")


# --- pixels and the shipped tokenizer --------------------------------------------------------


def test_pixels_round_trip_exactly():
    samples = generate_samples(2, seed=0, image_size=64, max_shapes=4)
    tensor = images_to_tensor([s.image for s in samples], 64)
    assert (
        tensor.shape == (2, 3, 64, 64) and -1.0 <= float(tensor.min()) <= float(tensor.max()) <= 1.0
    )
    back = tensor_to_images(tensor)
    assert all(
        np.array_equal(np.asarray(a.image), np.asarray(b))
        for a, b in zip(samples, back, strict=True)
    )
    small = images_to_tensor([samples[0].image], 32)  # nearest: still only palette colours
    palette = {(*c,) for c in [*COLOURS.values(), BACKGROUND]}
    assert {tuple(p) for p in tensor_to_uint8(small).reshape(-1, 3)} <= palette


def test_palette_agreement_snaps_to_the_nearest_colour():
    palette = [*COLOURS.values(), BACKGROUND]
    original = np.zeros((1, 4, 4, 3), dtype=np.uint8) + np.uint8(BACKGROUND)
    original[0, 1, 1] = COLOURS["red"]
    decoded = np.clip(original.astype(int) + 12, 0, 255).astype(np.uint8)  # near enough
    assert palette_agreement(original, decoded, palette).tolist() == [1.0]
    decoded[0, 2, 2] = COLOURS["blue"]
    assert palette_agreement(original, decoded, palette).tolist() == [15 / 16]


@pytest.mark.parametrize("name", ["shapes-vq", "shapes-vq-patch"])
def test_the_shipped_shapes_vqs_round_trip_the_t2i_world(name):
    """Both shipped shapes VQs: 64 px -> 8x8 codes, and every centred shape of the t2i world
    decodes to an image the shapes checker reads back exactly (the ceiling of t2i accuracy)."""
    from mmdistill.data.shapes_t2i import all_combinations, read_objects, render

    tokenizer = load_image_tokenizer(f"builtin:{name}")
    combos = all_combinations()
    codes = tokenizer.encode_images([render(a) for a in combos])
    assert codes.shape == (120, 8, 8) and tokenizer.config.codebook_size == 1024
    decoded = tokenizer.decode_images(codes)
    assert [read_objects(image) for image in decoded] == [[a] for a in combos]


def test_the_patch_shapes_vq_draws_an_object_with_the_same_codes_in_every_cell():
    """builtin:shapes-vq-patch is patch-local, so each (colour, shape, size) is the same 4x4 block of
    codes in all four cells and the background is one code: a held-out combination is a seen
    block in a seen cell."""
    from mmdistill.data.shapes_t2i import all_combinations, render

    tokenizer = load_image_tokenizer("builtin:shapes-vq-patch")
    combos = all_combinations()
    codes = tokenizer.encode_images([render(a) for a in combos])
    cells = ["top left", "top right", "bottom left", "bottom right"]
    blocks: dict[tuple, set] = {}
    background = set()
    for attrs, grid in zip(combos, codes, strict=True):
        row, col = divmod(cells.index(attrs.position), 2)
        block = grid[row * 4 : row * 4 + 4, col * 4 : col * 4 + 4]
        blocks.setdefault((attrs.colour, attrs.shape, attrs.size), set()).add(
            tuple(block.flatten().tolist())
        )
        rest = grid.clone()
        rest[row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] = -1
        background |= set(rest[rest >= 0].tolist())
    assert len(blocks) == 30 and all(len(seen) == 1 for seen in blocks.values())
    assert len(background) == 1
