"""Named model shapes (published sizes, random weights) for benchmarks and smoke tests.

``HOVLE_2_6B`` is HoVLE-2.6B's decoder: 8 embedding-module + 24 LLM InternLM2 layers, width 2048,
16 heads / 8 KV heads of 128, MLP 8192, RMSNorm eps 1e-5, RoPE theta 1e6, vocabulary 92553,
448-pixel tiles of 14-pixel patches (docs/hovle_format.md). :func:`text_config` builds a text-only
:class:`~mmdistill.lm_config.LMConfig` of a shape (the vision tower only changes which embeddings
enter the first layer, so decode speed is the same), :func:`hovle_config` one with HoVLE's
holistic-embedding front-end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .decoder import StackConfig
from .frontends.hovle_vision import HoVLEVisionConfig
from .lm_config import LMConfig


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a two-stack (embedding module + LLM) decoder."""

    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    embedding_layers: int
    llm_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    image_size: int = 448
    patch_size: int = 14

    def stack(self, name: str, layers: int, rope_scaling: dict | None = None) -> StackConfig:
        """One InternLM2-style stack of this shape."""
        return StackConfig(
            name=name,
            num_layers=layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
        )


HOVLE_2_6B = ModelShape(
    name="hovle-2.6b",
    hidden_size=2048,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=8192,
    embedding_layers=8,
    llm_layers=24,
    vocab_size=92553,
)
TINY = ModelShape(
    name="tiny",
    hidden_size=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=128,
    embedding_layers=2,
    llm_layers=2,
    vocab_size=256,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
SHAPES = {shape.name: shape for shape in (HOVLE_2_6B, TINY)}


def text_config(shape: ModelShape) -> LMConfig:
    """A text-front-end config of ``shape``."""
    return LMConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        stacks=[
            shape.stack("embedding", shape.embedding_layers),
            shape.stack("llm", shape.llm_layers),
        ],
        teacher={"source": f"random:{shape.name}"},
    )


def hovle_config(shape: ModelShape, llm_rope_scaling: dict | None = None) -> LMConfig:
    """A HoVLE-format config of ``shape`` (holistic-embedding front-end, two stacks)."""
    vision = HoVLEVisionConfig(
        hidden_size=shape.hidden_size,
        llm_vocab_size=shape.vocab_size,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        downsample_ratio=0.5,
        img_context_token_id=shape.vocab_size - 7,
    )
    return LMConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        stacks=[
            shape.stack("embedding", shape.embedding_layers),
            shape.stack("llm", shape.llm_layers, llm_rope_scaling),
        ],
        front_end={
            "type": "hovle",
            "vision": asdict(vision),
            "num_image_token": vision.num_image_token,
            "force_image_size": shape.image_size,
            "template": "internlm2-chat",
            "downsample_ratio": 0.5,
        },
        teacher={"source": f"random:{shape.name}"},
    )
