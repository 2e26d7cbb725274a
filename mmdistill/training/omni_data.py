"""What the OmniMamba stages of a run share: the frozen image tokenizer, the caption data encoded
to codes (once, cached), the student's image vocabulary, and each task stage's batches.

The image vocabulary and adapters are added before the first task stage
(:func:`prepare_student`): a student that already has them (a resumed run, or a ``student_dir``
trained before) must have been trained with the same image tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.captions import encode_caption_file
from ..data.shapes_t2i import write_caption_set
from ..data.t2i import CaptionRecords, T2IBatches, TaskBatches, caption_records
from ..errors import CheckpointError
from ..files import cache_root
from ..image_tokenizer import VQConfig, load_image_tokenizer
from ..image_vocab import ImageVocabSpec
from ..model import DecoderLM
from ..omni_student import add_image_vocabulary
from ..recipe import Recipe, StageSpec
from ..task_lora import LoraSpec
from .state import Run

SHAPES_T2I_VERSION = 1


@dataclass
class OmniData:
    """The image tokenizer, its description and the encoded t2i training sources."""

    image_tokenizer: object
    description: dict
    records: list[CaptionRecords]
    weights: list[float]


def caption_file(source: str, cache_dir: str | None) -> Path:
    """The caption JSONL of a t2i source (``builtin:shapes-t2i[/heldout]`` is written once)."""
    if not source.startswith("builtin:"):
        return Path(source)
    split = "heldout" if source.endswith("/heldout") else "train"
    root = Path(cache_dir) if cache_dir else cache_root() / "data"
    path = root / f"shapes-t2i-v{SHAPES_T2I_VERSION}" / f"{split}.jsonl"
    return path if path.is_file() else write_caption_set(path.parent, split)


def image_tokenizer_for(recipe: Recipe, device="cpu"):
    """The recipe's frozen image tokenizer and its description (source, config, digest)."""
    omni = recipe.omni
    config = (
        VQConfig.from_dict(omni.image_tokenizer_config) if omni.image_tokenizer_config else None
    )
    tokenizer = load_image_tokenizer(omni.image_tokenizer, config=config, device=device)
    description = {
        "source": omni.image_tokenizer,
        "digest": tokenizer.digest,
        "config": tokenizer.config.to_dict(),
    }
    return tokenizer, description


def load_omni_data(run: Run) -> OmniData:
    """Encode the recipe's t2i sources with its image tokenizer (cached) and tokenise captions."""
    omni = run.recipe.omni
    tokenizer, description = image_tokenizer_for(run.recipe)
    text = run.data.tokenizer
    records = []
    with run.procs.main_first():
        for spec in omni.t2i:
            path = caption_file(spec.source, omni.cache_dir)
            coded = encode_caption_file(path, tokenizer, omni.cache_dir, spec.image_root)
            captions, codes = coded.captions, coded.codes
            if spec.max_samples is not None:
                captions, codes = captions[: spec.max_samples], codes[: spec.max_samples]
            encode = lambda t: text.encode(t, add_special_tokens=False)  # noqa: E731
            records.append(caption_records(captions, codes, encode, omni.max_caption_tokens))
    return OmniData(tokenizer, description, records, [s.weight for s in omni.t2i])


def prepare_student(run: Run, student: DecoderLM) -> DecoderLM:
    """``student`` with the recipe's image vocabulary and adapters (added if it lacks them).

    Raises:
        CheckpointError: the student's image vocabulary came from another image tokenizer.
    """
    omni, data = run.recipe.omni, run.omni
    if student.image_vocab is not None:
        had = student.image_vocab.spec.image_tokenizer.get("digest")
        if had != data.description["digest"]:
            raise CheckpointError(
                f"the student's image vocabulary was trained with image tokenizer {had}, not "
                f"{omni.image_tokenizer} ({data.description['digest']}); use that tokenizer"
            )
        return student
    config = data.image_tokenizer.config
    spec = ImageVocabSpec(
        text_vocab_size=student.config.vocab_size,
        codebook_size=config.codebook_size,
        grid=config.grid,
        embed_dim=omni.image_embed_dim,
        positions=omni.image_positions,
        mode=omni.vocabulary,
        image_tokenizer=data.description,
    )
    lora = LoraSpec(**omni.lora.model_dump())
    run.log(f"adding an image vocabulary ({omni.vocabulary}, {config.codebook_size} codes)")
    return add_image_vocabulary(student, spec, lora, seed=run.recipe.seed)


def task_batches(run: Run, index: int, spec: StageSpec, student: DecoderLM) -> TaskBatches:
    """The micro-batches of task stage ``index``: mmu rows from ``data.train``, t2i rows from
    ``omni.t2i``, each with the stage's rows per micro-step."""
    recipe, procs = run.recipe, run.procs
    mmu = None
    if "mmu" in spec.tasks and spec.rows("mmu") > 0:
        mmu = run.batches(recipe.data.train, (recipe.data.seed, index), spec.rows("mmu"))
    t2i = None
    if "t2i" in spec.tasks and spec.rows("t2i") > 0:
        t2i = T2IBatches(
            run.omni.records,
            run.omni.weights,
            student.image_vocab.spec,
            (recipe.data.seed, index),
            spec.rows("t2i"),
            recipe.omni.caption_dropout,
            run.data.pad_token_id,
            procs.rank,
            procs.world,
        )
    return TaskBatches(mmu, t2i)
