"""Build the shapes-world image tokenizer (``builtin:shapes-vq``) into a directory and measure it.

Trains a small VQ (64 px images -> 8 x 8 codes; ``--architecture patch``, the shipped one, or
LlamaGen's) on the shapes world
(:mod:`mmdistill.data.synthetic`): scenes of 1-4 shapes drawn from the ``"train"`` split, plus
every single shape centred in its cell (5 colours x 3 shapes x 2 sizes x 4 cells = 120 images).
The loss is L1 + L2 reconstruction plus LlamaGen's codebook and commitment losses (no GAN or
perceptual loss: the images are flat colours); codes unused for a while are moved onto encoder
outputs of the current batch. Then it measures encode -> decode on 200 held-out ``"eval"`` images
and on the 120 centred images (pixels whose nearest palette colour matches the original's;
for the centred images, the decoded shape's colour and bounding box) and writes the tokenizer
and a build record (``build_record.json``) into ``--out`` atomically::

    python scripts/build_shapes_vq.py --out mmdistill/assets/shapes_vq --threads 2   # shipped
    python scripts/build_shapes_vq.py --out /tmp/vq --steps 50 --json                   # smoke

The defaults are the shipped tokenizer's (patch-local, 4000 steps; about 4.5 minutes on a 2-core
CPU). The LlamaGen-architecture one shipped before was built on a GPU with
``--architecture llamagen --device cuda --steps 3500 --batch 64 --scenes 4000 --centred-repeats 4
--lr 2e-3``.

The same arguments on the same machine and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmdistill.data.shapes_t2i import all_combinations, read_objects, render
from mmdistill.data.synthetic import BACKGROUND, COLOURS, generate_samples
from mmdistill.files import WEIGHTS_NAME, atomic_directory
from mmdistill.image_tokenizer import (
    ImageTokenizer,
    VQConfig,
    VQModel,
    images_to_tensor,
    load_image_tokenizer,
    palette_agreement,
    palette_indices,
    tensor_to_uint8,
)
from mmdistill.image_tokenizer.loading import write_tokenizer_files

SHAPES_VQ_CONFIGS = {
    # Patch-local (shipped): each code is one 8 x 8 patch, so an object's codes do not depend on
    # the rest of the image (docs/omni.md, "Image tokenizer").
    "patch": VQConfig(
        codebook_size=1024,
        codebook_embed_dim=8,
        z_channels=64,
        ch=256,
        ch_mult=(1, 1, 1, 1),
        image_size=64,
        architecture="patch",
    ),
    # LlamaGen's architecture at 64 px (shipped until 2026-12-03).
    "llamagen": VQConfig(
        codebook_size=1024,
        codebook_embed_dim=8,
        z_channels=64,
        ch=32,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        image_size=64,
    ),
}
PALETTE = [*COLOURS.values(), BACKGROUND]
RECORD_NAME = "build_record.json"


def centred_images(image_size: int) -> list:
    """Every single shape centred in its cell (the text-to-image world, all 120 combinations)."""
    return [render(attrs, image_size) for attrs in all_combinations()]


def training_pixels(n_scenes: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(random scenes, centred shapes)`` as ``[n, 3, size, size]`` tensors in [-1, 1]."""
    scenes = generate_samples(n_scenes, seed, size, max_shapes=4, split="train", kinds=())
    centred = centred_images(size)
    return images_to_tensor([s.image for s in scenes], size), images_to_tensor(centred, size)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_step(
    model: VQModel, batch: torch.Tensor, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """One optimisation step; returns the losses, the codes and the normalised latents."""
    z = model.quant_conv(model.encoder(batch))
    z_q, codes, vq = model.quantize(z)
    recon = model.decoder(model.post_quant_conv(z_q))
    losses = {"l1": F.l1_loss(recon, batch), "l2": F.mse_loss(recon, batch), **vq}
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    flat = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
    return {k: float(v.detach()) for k, v in losses.items()}, codes.flatten(), flat


@torch.no_grad()
def reset_dead_codes(model: VQModel, used: torch.Tensor, latents: torch.Tensor, gen) -> int:
    """Move the codes never chosen since the last reset onto random latents; returns how many."""
    dead = (used == 0).nonzero().flatten()
    if len(dead):
        pick = torch.randint(len(latents), (len(dead),), generator=gen).to(latents.device)
        model.quantize.embedding.weight[dead] = latents[pick]
    return len(dead)


def sample_batch(data: torch.Tensor, args, step: int, gen: torch.Generator) -> torch.Tensor:
    """``args.batch`` images; during the first ``args.crop_fraction`` of the steps, four times
    as many ``args.crop``-pixel crops at code-aligned offsets instead (same compute)."""
    if step >= args.steps * args.crop_fraction:
        return data[torch.randint(len(data), (args.batch,), generator=gen)]
    n, size, crop, align = 4 * args.batch, data.shape[-1], args.crop, 8
    images = data[torch.randint(len(data), (n,), generator=gen)]
    offsets = torch.randint((size - crop) // align + 1, (n, 2), generator=gen) * align
    return torch.stack(
        [
            im[:, y : y + crop, x : x + crop]
            for im, (y, x) in zip(images, offsets.tolist(), strict=True)
        ]
    )


def train(model: VQModel, data: torch.Tensor, args, log: Callable[[str], None]) -> dict:
    """Train ``model`` on ``data`` for ``args.steps`` steps; returns the mean final losses."""
    gen = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0)
    used = torch.zeros(model.config.codebook_size, dtype=torch.long)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = sample_batch(data, args, step, gen)
        losses, codes, latents = train_step(model, batch, optimizer)
        used += torch.bincount(codes.cpu(), minlength=len(used))
        history.append(losses)
        if (step + 1) % args.reset_every == 0 and step < args.steps * 0.75:
            reset = reset_dead_codes(model, used, latents, gen)
            log(f"step {step + 1}: {reset} dead codes reset, {int((used > 0).sum())} in use")
            used.zero_()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = {k: np.mean([h[k] for h in history[-args.log_every :]]) for k in losses}
            shown = " ".join(f"{k} {v:.4f}" for k, v in mean.items())
            log(f"step {step + 1}/{args.steps} {shown} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    tail = history[-min(50, len(history)) :]
    return {k: round(float(np.mean([h[k] for h in tail])), 5) for k in history[-1]}


def shape_box(indices: np.ndarray) -> tuple[list[int] | None, np.ndarray]:
    """Inclusive ``[x0, y0, x1, y1]`` of the non-background pixels (None if none), and their
    palette indices."""
    ys, xs = np.nonzero(indices != len(PALETTE) - 1)
    if not len(xs):
        return None, np.empty(0, dtype=np.int64)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())], indices[ys, xs]


def centred_checks(original: np.ndarray, decoded: np.ndarray, colours: list[int]) -> dict:
    """Per centred image: the decoded shape's box within 2 px of the original's, and the share
    of decoded shape pixels of the right colour."""
    box_errors, colour_shares = [], []
    for orig, dec, colour in zip(original, decoded, colours, strict=True):
        want, _ = shape_box(palette_indices(orig, PALETTE))
        got, values = shape_box(palette_indices(dec, PALETTE))
        error = 99 if got is None else max(abs(a - b) for a, b in zip(want, got, strict=True))
        box_errors.append(error)
        colour_shares.append(float((values == colour).mean()) if len(values) else 0.0)
    return {
        "bbox_within_2px": sum(e <= 2 for e in box_errors),
        "bbox_max_error_px": max(box_errors),
        "all_shape_pixels_right_colour": sum(s == 1.0 for s in colour_shares),
        "min_right_colour_share": round(min(colour_shares), 5),
        "images": len(box_errors),
    }


def agreement_stats(tokenizer: ImageTokenizer, pixels: torch.Tensor) -> tuple[dict, np.ndarray]:
    """Palette agreement of encode -> decode over ``pixels``; also the decoded uint8 images."""
    with torch.no_grad():
        decoded = torch.cat(
            [tokenizer.model.decode(tokenizer.model.encode(b)) for b in pixels.split(50)]
        )
    original, decoded_u8 = tensor_to_uint8(pixels), tensor_to_uint8(decoded)
    per_image = palette_agreement(original, decoded_u8, PALETTE)
    stats = {
        "pixel_agreement": round(float(per_image.mean()), 5),
        "min_image_agreement": round(float(per_image.min()), 5),
        "images_at_least_99": int((per_image >= 0.99).sum()),
        "images": len(per_image),
    }
    return stats, decoded_u8


def measure(tokenizer: ImageTokenizer, eval_images: int, eval_seed: int) -> dict:
    """The quality numbers of the build record."""
    size = tokenizer.config.image_size
    held_out = generate_samples(eval_images, eval_seed, size, 4, split="eval", kinds=())
    pixels = images_to_tensor([s.image for s in held_out], size).to(tokenizer.device)
    eval_stats, _ = agreement_stats(tokenizer, pixels)
    combos = all_combinations()
    centred = images_to_tensor(centred_images(size), size).to(tokenizer.device)
    centred_stats, decoded = agreement_stats(tokenizer, centred)
    colours = [list(COLOURS).index(a.colour) for a in combos]
    centred_stats |= centred_checks(tensor_to_uint8(centred), decoded, colours)
    read = [
        read_objects(Image.fromarray(image)) == [a]
        for image, a in zip(decoded, combos, strict=True)
    ]
    centred_stats["checker_reads_back"] = sum(read)
    return {"heldout_eval_split": eval_stats, "centred_single_shapes": centred_stats}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write it to")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--architecture", choices=sorted(SHAPES_VQ_CONFIGS), default="patch", help="VQ encoder"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data and batches")
    parser.add_argument("--steps", type=int, default=4000, help="optimisation steps")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    parser.add_argument("--scenes", type=int, default=1000, help="random training scenes")
    parser.add_argument("--centred-repeats", type=int, default=100, help="copies of centred images")
    parser.add_argument("--crop", type=int, default=32, help="side of the early crops")
    parser.add_argument("--crop-fraction", type=float, default=0.75, help="share of crop steps")
    parser.add_argument("--reset-every", type=int, default=200, help="dead-code reset period")
    parser.add_argument("--log-every", type=int, default=100, help="progress period (steps)")
    parser.add_argument("--eval-images", type=int, default=200, help="held-out images measured")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out images")
    parser.add_argument("--json", action="store_true", help="print the build record on stdout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = SHAPES_VQ_CONFIGS[args.architecture]
    scenes, centred = training_pixels(args.scenes, args.seed, config.image_size)
    data = torch.cat([scenes, centred.repeat(args.centred_repeats, 1, 1, 1)]).to(args.device)
    model = VQModel(config).to(args.device)
    log(f"training {sum(p.numel() for p in model.parameters())} parameters on {len(data)} images")
    final_losses = train(model, data, args, log)
    train_seconds = time.perf_counter() - start
    command = "python scripts/build_shapes_vq.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    tokenizer = ImageTokenizer(model, source=command)
    record = {
        "command": command,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "json", "threads")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_losses": final_losses,
        **measure(tokenizer, args.eval_images, args.eval_seed),
    }
    model = model.cpu()
    tokenizer = ImageTokenizer(model, source=command)
    with atomic_directory(args.out, overwrite=True) as tmp:
        write_tokenizer_files(tmp, model, command)
        record["weights_bytes"] = (tmp / WEIGHTS_NAME).stat().st_size
        record["digest"] = tokenizer.digest
        record["build_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    if load_image_tokenizer(args.out).digest != tokenizer.digest:
        raise SystemExit(f"error: {args.out} does not load back to the trained weights")
    print(json.dumps(record, indent=2) if args.json else summary(record))
    return 0


def summary(record: dict) -> str:
    """A few lines for the terminal."""
    held, centred = record["heldout_eval_split"], record["centred_single_shapes"]
    return "\n".join(
        [
            f"built in {record['build_seconds']}s ({record['threads']} threads), "
            f"{record['weights_bytes'] / 1e6:.1f} MB, digest {record['digest']}",
            f"held-out: {held['pixel_agreement']:.4f} palette-pixel agreement "
            f"(min image {held['min_image_agreement']:.4f}) on {held['images']} images",
            f"centred: {centred['pixel_agreement']:.4f} agreement, bbox within 2 px "
            f"{centred['bbox_within_2px']}/{centred['images']}, right colour "
            f"{centred['all_shape_pixels_right_colour']}/{centred['images']}, read back by the "
            f"t2i checker {centred['checker_reads_back']}/{centred['images']}",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
