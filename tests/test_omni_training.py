"""OmniMamba stages on the trainer: seed -> distil -> t2i alone -> mmu alone -> both, in one run
on the tiny HoVLE teacher with a tiny random VQ tokenizer; each task stage trains only its own
parameters, the saved student generates, and an interrupted task stage resumes exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from mmdistill.files import read_safetensors
from mmdistill.image_tokenizer import ImageTokenizer, VQConfig, VQModel
from mmdistill.recipe import load_recipe
from mmdistill.roles import parameter_role
from mmdistill.t2i_evaluation import generate_images, load_t2i_student
from mmdistill.trainer import distill
from mmdistill.training.checkpoints import CHECKPOINTS, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
VQ = VQConfig(
    codebook_size=32,
    codebook_embed_dim=4,
    z_channels=32,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    image_size=8,
)
OMNI = (
    "omni={image_tokenizer: %s, image_embed_dim: 16, t2i: [{source: builtin:shapes-t2i}], "
    "max_caption_tokens: 16, cache_dir: %s}"
)
STAGES = (
    "stages=["
    "{name: distil, trainable: [ssm], loss: {mse_weight: 1000}, lr: 1e-2, steps: 2},"
    "{name: t2i, task: t2i, trainable: [lora, image_embeddings, image_head], lr: 1e-2,"
    " steps: 2, batch_size: 4},"
    "{name: mmu, task: mmu, trainable: [lora, vision], lr: 1e-2, steps: 2},"
    "{name: both, task: both, task_ratio: {mmu: 1, t2i: 2},"
    " trainable: [lora, vision, image_embeddings, image_head], lr: 1e-2, steps: 3}]"
)


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return ImageTokenizer(VQModel(VQ)).save(tmp_path_factory.mktemp("vq") / "vq")


def omni_recipe(out: Path, vq_dir: Path, cache: Path, *overrides: str):
    return load_recipe(
        ROOT / "recipes" / "tiny.yaml",
        [
            f"output_dir={out}",
            f"data.cache_dir={cache}",
            "data.shapes={n_train: 32, n_eval: 8, text_lines: 50}",
            "data.eval=[]",
            "logging.progress=false",
            "checkpoint={every: 0, keep: 10}",
            OMNI % (vq_dir, cache),
            STAGES,
            *overrides,
        ],
    )


def _stage_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each end-of-stage checkpoint's weights, by stage name."""
    found = {}
    for path in list_checkpoints(out / CHECKPOINTS):
        found[path.name.split("-", 3)[-1]] = read_safetensors(path)
    return found


def _changed(a: dict, b: dict) -> set[str]:
    """Roles (``lora.ADAPTER`` for adapters) with a tensor that differs between ``a`` and ``b``."""
    out = set()
    for key in b:
        if not torch.equal(a[key], b[key]):
            role = parameter_role(key)
            out.add(f"{role}.{key.split('.')[-2]}" if role == "lora" else role)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vq_dir):
    tmp = tmp_path_factory.mktemp("omni")
    out = tmp / "run"
    report = distill(omni_recipe(out, vq_dir, tmp / "cache"))
    return out, report


def test_one_run_seeds_distils_and_trains_both_tasks(trained):
    out, report = trained
    assert [s["mode"] for s in report["stages"]] == [
        "layerwise",
        "task:t2i",
        "task:mmu",
        "task:both",
    ]
    final = report["stages"][-1]["final_parts"]
    assert set(final) == {"mmu", "t2i"}
    student = Path(report["student_dir"])
    assert (student / "image_tokenizer" / "config.json").is_file()
    assert {p.name for p in (student / "adapters").iterdir()} == {"mmu", "t2i"}


def test_each_task_stage_trains_only_its_own_parameters(trained):
    out, _ = trained
    weights = _stage_weights(out)
    after_t2i, after_mmu, after_both = weights["t2i"], weights["mmu"], weights["both"]
    mmu_b = [k for k in after_t2i if ".lora_B.mmu." in k]
    assert mmu_b and not any(after_t2i[k].any() for k in mmu_b)  # still its initial zeros
    assert any(after_t2i[k].any() for k in after_t2i if ".lora_B.t2i." in k)
    assert _changed(after_t2i, after_mmu) == {"vision", "lora.mmu"}
    assert _changed(after_mmu, after_both) == {
        "vision",
        "lora.mmu",
        "lora.t2i",
        "image_embeddings",
        "image_head",
    }


def test_the_saved_student_draws(trained):
    _, report = trained
    student = load_t2i_student(report["student_dir"])
    images, crossed = generate_images(student, ["a large red circle in the top left."] * 2)
    assert len(images) == 2 and images[0].size == (VQ.image_size, VQ.image_size)
    assert crossed == 0


def test_an_interrupted_task_stage_resumes_exactly(tmp_path, trained, vq_dir):
    _, report = trained
    out = tmp_path / "run"
    recipe = omni_recipe(out, vq_dir, tmp_path / "cache", "checkpoint={every: 1, keep: 10}")

    def stop(record):
        if (record["stage"], record["step"]) == ("both", 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(recipe, callbacks=[stop])
    resumed = distill(recipe, resume=True)
    first = read_safetensors(Path(report["student_dir"]))
    again = read_safetensors(Path(resumed["student_dir"]))
    assert first.keys() == again.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0, msg=key)


def test_resuming_a_run_killed_after_its_last_stage_writes_a_whole_student(
    tmp_path, trained, vq_dir
):
    """Killed between the last checkpoint and the student (no stage left to run on resume): the
    student written on resume still carries its image tokenizer and draws."""
    out, report = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "student")
    resumed = distill(omni_recipe(copy, vq_dir, tmp_path / "cache"), resume=True)
    student = load_t2i_student(resumed["student_dir"])
    images, crossed = generate_images(student, ["a large red circle in the top left."])
    assert len(images) == 1 and crossed == 0
    first = read_safetensors(Path(report["student_dir"]))
    assert read_safetensors(Path(resumed["student_dir"])).keys() == first.keys()


def test_the_cli_draws_on_either_decode_path(trained, tmp_path, monkeypatch, capfd):
    """``generate --task t2i``, default and ``--eager``: on CPU both are the reference loop,
    so the images agree (the fixture's 8-px images are too small for the shapes checker of
    ``eval --task t2i``)."""
    _, report = trained
    student = report["student_dir"]
    caption = "a large red circle in the top left."
    pngs = []
    for extra in ([], ["--eager"]):
        out = tmp_path / f"img{len(pngs)}.png"
        code, _, err = run_cli(
            monkeypatch,
            capfd,
            "generate",
            student,
            "--task",
            "t2i",
            "-p",
            caption,
            "--out",
            str(out),
            *extra,
        )
        assert code == 0, err
        pngs.append(out.read_bytes())
    assert pngs[0] == pngs[1]
