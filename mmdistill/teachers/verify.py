"""Check a teacher conversion against transformers' own forward, on a truncated copy.

A conversion is right when the canonical model computes what transformers' own class computes
from the same checkpoint. Running a large teacher twice would take minutes and tens of GB, so
the check builds a *truncated* checkpoint from the real weights: the embeddings, the final norm,
the head and a few decoder layers (the first two, and the first of each other kind of layer
transformers' config gives, e.g. ``sliding_attention``), with a sliding window longer than
``VERIFY_WINDOW`` shrunk to it so that the ``VERIFY_LENGTH``-token check crosses it. Both sides
read that checkpoint: the adapter converts it as usual, and transformers builds its class from
the truncated config and loads the same tensors. Logits and the residual stream entering each
layer are compared in float32 on the CPU; the first place they differ is named.

The full config is checked too, without weights: each layer's sliding window as the adapter
reads it against transformers' config (``layer_types`` and ``sliding_window``).

A multimodal checkpoint with a ``text_config`` (LLaVA) is cut down in its language model only;
its check feeds one random image per sequence through the (whole) vision tower, with the image
tokens where the processor puts them, and transformers loads the cut-down checkpoint with
``from_pretrained`` (which reads LLaVA's saved key names).

Checkpoints whose architecture transformers has no class for (remote-code models such as
InternLM2 and HoVLE) are not verified here; their adapters are tested against the models' own
code instead.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import TeacherError
from ..model import DecoderLM

VERIFY_WINDOW = 16
VERIFY_LENGTH = 40
_LAYER_KEY = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")

Convert = Callable[[dict, dict[str, torch.Tensor]], DecoderLM]


def reference_class(hf_config: dict):
    """transformers' model class for the checkpoint's architecture, or ``None``."""
    import transformers

    for arch in hf_config.get("architectures") or []:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and hasattr(cls, "config_class"):
            return cls
    return None


def text_part(config):
    """The part of a config (dict or object) that describes the decoder layers."""
    if isinstance(config, dict):
        return config.get("text_config") or config
    return getattr(config, "text_config", None) or config


def reference_windows(hf_config: dict, cls) -> tuple[list[int | None], object]:
    """Each layer's sliding window as transformers reads ``hf_config``, and its (text) config."""
    config = text_part(cls.config_class.from_dict(copy.deepcopy(hf_config)))
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers, config
    return [window if t == "sliding_attention" else None for t in types], config


def layer_windows_of(model_config) -> list[int | None]:
    """Each layer's sliding window in a canonical :class:`~mmdistill.model.LMConfig`."""
    return [model_config.stacks[i].sliding_window for i in model_config.stack_of_layer()]


def chosen_layers(windows: list[int | None]) -> list[int]:
    """The first two layers and the first layer of each other window."""
    chosen = set(range(min(2, len(windows))))
    for window in set(windows):
        chosen.add(windows.index(window))
    return sorted(chosen)


def truncated_checkpoint(
    hf_config: dict, tensors: dict[str, torch.Tensor], layers: list[int], reference_config
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``hf_config`` and ``tensors`` cut down to ``layers`` (renumbered from 0)."""
    small = copy.deepcopy(hf_config)
    text = text_part(small)
    text["num_hidden_layers"] = len(layers)
    types = getattr(reference_config, "layer_types", None)
    if types is not None:
        text["layer_types"] = [types[i] for i in layers]
    window = text.get("sliding_window")
    if isinstance(window, int) and window > VERIFY_WINDOW:
        text["sliding_window"] = VERIFY_WINDOW
    renumber = {old: new for new, old in enumerate(layers)}
    kept = {}
    for key, tensor in tensors.items():
        match = _LAYER_KEY.match(key)
        if match is None or "vision_tower" in key:
            kept[key] = tensor
        elif int(match.group(2)) in renumber:
            kept[f"{match.group(1)}{renumber[int(match.group(2))]}{match.group(3)}"] = tensor
    return small, kept


def _reference_from_folder(cls, hf_config: dict, tensors: dict[str, torch.Tensor]):
    """``cls.from_pretrained`` of the checkpoint written to a temporary folder: transformers maps
    a multimodal checkpoint's saved key names to its modules itself."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config))
        save_file(
            {k: v.float().contiguous() for k, v in tensors.items()}, f"{tmp}/model.safetensors"
        )
        model, info = cls.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    if info["missing_keys"]:
        raise TeacherError(
            f"transformers' {cls.__name__} expects weights the checkpoint lacks, e.g. "
            f"{', '.join(sorted(info['missing_keys'])[:5])}"
        )
    return model.eval()


def reference_model(cls, hf_config: dict, tensors: dict[str, torch.Tensor]):
    """transformers' own model of ``hf_config`` holding ``tensors`` (float32, eager attention)."""
    from transformers.initialization import no_init_weights

    if "text_config" in hf_config:
        return _reference_from_folder(cls, hf_config, tensors)
    config = cls.config_class.from_dict(copy.deepcopy(hf_config))
    config._attn_implementation = "eager"
    with no_init_weights():  # every weight is loaded next: skip the random initialisation
        model = cls(config).float().eval()
    result = model.load_state_dict(
        {k: v.float() for k, v in tensors.items()}, strict=False, assign=True
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing:
        raise TeacherError(
            f"transformers' {cls.__name__} expects weights the checkpoint lacks, e.g. "
            f"{', '.join(missing[:5])}"
        )
    return model


def check_inputs(hf_config: dict, converted_config) -> dict[str, torch.Tensor]:
    """Random token ids (and, for LLaVA, one random image per row with its image tokens after
    the first token) that both forwards take."""
    g = torch.Generator().manual_seed(0)
    front = converted_config.front_end
    images = int(front.get("num_image_token", 0)) if front.get("type") == "llava" else 0
    vocab = text_part(hf_config)["vocab_size"]
    ids = torch.randint(0, vocab, (2, VERIFY_LENGTH + images), generator=g)
    if not images:
        return {"input_ids": ids}
    image_token = front["image_token_id"]
    ids[ids == image_token] = (image_token + 1) % vocab
    ids[:, 1 : 1 + images] = image_token
    size = int(hf_config["vision_config"]["image_size"])
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, size, size, generator=g)}


def first_difference(ours, theirs, layers: list[int], tol: float) -> tuple[str, float] | None:
    """Where the two forwards first differ by more than ``tol`` (and by how much), or None."""
    entering = list(ours.hidden_states[: len(layers)])
    for k, (a, b) in enumerate(zip(entering, theirs.hidden_states[: len(layers)], strict=True)):
        diff = (a - b).abs().max().item()
        if diff > tol * max(1.0, b.abs().max().item()):
            return ("the embeddings" if k == 0 else f"layer {layers[k - 1]}"), diff
    diff = (ours.logits - theirs.logits).abs().max().item()
    if diff > tol * max(1.0, theirs.logits.abs().max().item()):
        return f"layer {layers[-1]}, the final norm or the LM head", diff
    return None


def verify_conversion(
    hf_config: dict,
    tensors: dict[str, torch.Tensor],
    converted_config,
    convert: Convert,
    source: str,
    adapter: str,
    tol: float = 1e-4,
) -> dict:
    """Compare the adapter's conversion with transformers' own forward (module docstring).

    Args:
        hf_config: the checkpoint's ``config.json``; tensors: its weights (source key names).
        converted_config: the canonical config the adapter gave for the full checkpoint.
        convert: ``(hf_config, tensors) -> DecoderLM``, the adapter's conversion.
        source, adapter: the teacher source and the adapter's name, for messages.
        tol: largest difference allowed, relative to the reference's largest magnitude.

    Returns:
        What was checked (``reference``, ``layers``, ``tokens``, ``max_abs_diff``,
        ``seconds``), or ``{"skipped": reason}``.

    Raises:
        TeacherError: the conversion differs, naming where.
    """
    cls = reference_class(hf_config)
    if cls is None:
        archs = ", ".join(map(str, hf_config.get("architectures") or ["(none)"]))
        return {"skipped": f"transformers has no class for {archs}"}
    import transformers

    start = time.perf_counter()
    windows, reference_config = reference_windows(hf_config, cls)
    ours = layer_windows_of(converted_config)
    for i, (mine, theirs) in enumerate(zip(ours, windows, strict=True)):
        if mine != theirs:
            raise TeacherError(
                f"{source}: the conversion gives layer {i} a sliding window of {mine}, "
                f"transformers' {cls.__name__} gives it {theirs}; the adapter reads this "
                "config.json wrongly (convert with --no-verify only if you know better)"
            )
    layers = chosen_layers(windows)
    small_config, small_tensors = truncated_checkpoint(hf_config, tensors, layers, reference_config)
    inputs = check_inputs(hf_config, converted_config)
    with torch.no_grad():
        mine = convert(small_config, small_tensors).float()(**inputs, output_hidden_states=True)
        reference = reference_model(cls, small_config, small_tensors)
        theirs = reference(**inputs, output_hidden_states=True)
    found = first_difference(mine, theirs, layers, tol)
    diff = (mine.logits - theirs.logits).abs().max().item()
    if found is not None:
        where, amount = found
        raise TeacherError(
            f"{source}: the conversion differs from transformers' {cls.__name__} at {where} "
            f"(max |difference| {amount:.3g}); the '{adapter}' adapter "
            "reads this checkpoint wrongly. Convert with --no-verify only if you know better."
        )
    return {
        "reference": f"transformers {transformers.__version__} {cls.__name__}",
        "layers": layers,
        "tokens": inputs["input_ids"].shape[1],
        "max_abs_diff": diff,
        "seconds": round(time.perf_counter() - start, 2),
    }


def verification_summary(checked: dict | None) -> str:
    """One line for a report: what the verification compared, or why it was skipped."""
    if not checked:
        return "not recorded"
    if "skipped" in checked:
        return f"skipped: {checked['skipped']}"
    return (
        f"{checked['reference']}, layers {checked['layers']}: "
        f"max |diff| {checked['max_abs_diff']:.1e}"
    )
