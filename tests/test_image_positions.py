"""Position embeddings of image codes (``image_vocab.positions``): each kind equals the sum of
the table rows an independent loop over rows and columns names; students save and load with it;
a bad kind is one error."""

from __future__ import annotations

import pytest
import torch

from mmdistill import load_student, seed
from mmdistill.image_vocab import CodePositions, ImageVocabSpec
from mmdistill.omni_student import add_image_vocabulary
from mmdistill.recipe import OmniSpec
from mmdistill.task_lora import LoraSpec

GRID, WIDTH = 8, 6


def _expected_rows(kind: str, r: int, c: int) -> list[int]:
    if kind == "raster":
        return [r * GRID + c]
    if kind == "rowcol":
        return [r, GRID + c]
    tile = int(kind.split(":")[1])
    tiles = (GRID // tile) ** 2
    return [(r // tile) * (GRID // tile) + c // tile, tiles + (r % tile) * tile + c % tile]


@pytest.mark.parametrize("kind", ["raster", "rowcol", "tile:4", "tile:2", "tile:8", "tile:1"])
def test_each_kind_sums_the_rows_of_its_row_and_column(kind):
    positions = CodePositions(kind, GRID, WIDTH)
    torch.nn.init.normal_(positions.weight, generator=torch.Generator().manual_seed(0))
    where = torch.arange(GRID * GRID).reshape(2, -1)
    out = positions(where)
    assert out.shape == (2, GRID * GRID // 2, WIDTH)
    for r in range(GRID):
        for c in range(GRID):
            i = r * GRID + c
            want = sum(positions.weight[j] for j in _expected_rows(kind, r, c))
            torch.testing.assert_close(out.reshape(-1, WIDTH)[i], want, rtol=0, atol=0)


def test_tile_four_shares_within_tile_vectors_across_tiles():
    positions = CodePositions("tile:4", GRID, WIDTH)
    torch.nn.init.normal_(positions.weight, generator=torch.Generator().manual_seed(1))
    outer = positions.weight[:4]
    out = positions(torch.arange(GRID * GRID)).reshape(GRID, GRID, WIDTH)
    top_left, bottom_right = out[:4, :4] - outer[0], out[4:, 4:] - outer[3]
    torch.testing.assert_close(top_left, bottom_right)


def test_none_adds_nothing_and_has_no_rows():
    positions = CodePositions("none", GRID, WIDTH)
    assert positions.weight.numel() == 0
    assert torch.count_nonzero(positions(torch.arange(5))) == 0


@pytest.mark.parametrize("kind", ["tile:3", "tile:0", "grid", "tile:x"])
def test_a_bad_kind_is_one_clear_error(kind):
    with pytest.raises(ValueError, match="raster, rowcol, none or tile:T"):
        ImageVocabSpec(text_vocab_size=10, codebook_size=4, grid=GRID, positions=kind)


def test_the_recipe_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="image_positions"):
        OmniSpec(t2i=[{"source": "builtin:shapes-t2i"}], image_positions="diagonal")


def test_a_student_saves_and_loads_its_position_kind(hovle, tmp_path):
    base = seed(hovle, attention_layers="0", seed=0).float()
    spec = ImageVocabSpec(
        text_vocab_size=base.config.vocab_size,
        codebook_size=16,
        grid=4,
        embed_dim=8,
        positions="tile:2",
    )
    student = add_image_vocabulary(base, spec, LoraSpec(dropout=0.0), seed=1)
    assert student.image_vocab.position.weight.shape == (4 + 4, 8)
    student.save_pretrained(tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    assert loaded.image_vocab.spec.positions == "tile:2"
    torch.testing.assert_close(
        loaded.image_vocab.position.weight, student.image_vocab.position.weight
    )


def test_raster_draws_its_initial_table_as_nn_embedding_did():
    """Students and the demo's numbers stay reproducible: the raster table takes the same draws
    from the global generator as the ``nn.Embedding`` it replaced, and leaves it in the same
    state."""
    torch.manual_seed(0)
    positions = CodePositions("raster", GRID, WIDTH)
    after = torch.rand(3)
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(GRID * GRID, WIDTH)
    torch.testing.assert_close(positions.weight, embedding.weight, rtol=0, atol=0)
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)
