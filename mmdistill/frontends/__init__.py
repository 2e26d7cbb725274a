"""Front-ends: what turns token ids (and images) into the decoder's input embeddings.

A model's ``config.front_end["type"]`` names its front-end class here. Built in: ``text`` (token
embeddings), ``hovle`` (HoVLE's holistic embedding: patch embedding, pixel shuffle and
projection written over the image-context tokens) and ``llava`` (transformers' own vision tower
and projector written over the image tokens). An in-house front-end is registered with
:func:`register_front_end` before its model is built.
"""

from __future__ import annotations

from torch import nn

from .hovle import HoVLEFrontEnd
from .llava import LlavaFrontEnd
from .text import TextFrontEnd

FRONT_ENDS: dict[str, type[nn.Module]] = {
    "text": TextFrontEnd,
    "hovle": HoVLEFrontEnd,
    "llava": LlavaFrontEnd,
}


def register_front_end(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make ``cls`` (built as ``cls(config)``) the front-end of ``front_end["type"] == name``."""
    FRONT_ENDS[name] = cls
    return cls


def front_end_class(kind: str) -> type[nn.Module]:
    """The registered front-end class for ``kind``.

    Raises:
        ValueError: for a type nobody registered.
    """
    if kind not in FRONT_ENDS:
        raise ValueError(f"unknown front_end type {kind!r}; known: {sorted(FRONT_ENDS)}")
    return FRONT_ENDS[kind]


__all__ = [
    "FRONT_ENDS",
    "HoVLEFrontEnd",
    "LlavaFrontEnd",
    "TextFrontEnd",
    "front_end_class",
    "register_front_end",
]
