"""The configuration every teacher and student is described by (a checkpoint's ``config.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .decoder import StackConfig

LAYER_TYPES = ("attention", "mamba")


@dataclass
class LMConfig:
    """Everything needed to rebuild a teacher or student without its source checkpoint.

    Attributes:
        vocab_size: rows of the LM head.
        hidden_size: model width (shared by every stack).
        stacks: the decoder stacks in order.
        layer_types: ``"attention"`` or ``"mamba"`` for each layer of the flat list.
        mixer: options for the Mamba-2 mixers (``conv_kernel``, ``gate_order``, ...).
        front_end: ``{"type": "text"}`` (with ``"embedding_scale"`` when the token embeddings are
            multiplied, e.g. Gemma's ``sqrt(hidden_size)``) or a registered multimodal front-end
            with its settings.
        final_norm_eps: epsilon of the final RMSNorm.
        tie_word_embeddings: LM head shares the token-embedding matrix.
        final_logit_softcap: the LM head's logits become ``cap * tanh(logits / cap)`` (Gemma 2).
        bos_token_id, eos_token_id, pad_token_id: special ids (eos may be a list).
        chat_template: Jinja or named template for chat prompts, if the teacher has one.
        teacher: provenance (source, architecture, weight hashes, the teacher's own config).
        image_vocab: the image vocabulary for text-to-image generation
            (:class:`~mmdistill.image_vocab.ImageVocabSpec` as a dict), or ``None``.
        lora: the task adapters (:class:`~mmdistill.task_lora.LoraSpec` as a dict), or ``None``.
        layout: how ``auto:K`` chose the attention layers (the spec, the chosen layers, every
            layer's score: :mod:`mmdistill.layer_scores`), or ``None``.
        version: the mmdistill version that wrote the config.
    """

    vocab_size: int
    hidden_size: int
    stacks: list[StackConfig]
    layer_types: list[str] | None = None
    mixer: dict = field(default_factory=dict)
    front_end: dict = field(default_factory=lambda: {"type": "text"})
    final_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None
    teacher: dict = field(default_factory=dict)
    image_vocab: dict | None = None
    lora: dict | None = None
    layout: dict | None = None
    version: str = ""

    def __post_init__(self) -> None:
        self.stacks = [
            s if isinstance(s, StackConfig) else StackConfig.from_dict(s) for s in self.stacks
        ]
        if not self.stacks:
            raise ValueError("a model needs at least one decoder stack")
        if self.layer_types is None:
            self.layer_types = ["attention"] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"layer_types must be in {LAYER_TYPES}; got {bad}")
        if "type" not in self.front_end:
            raise ValueError("front_end needs a 'type'")

    @property
    def num_layers(self) -> int:
        return sum(s.num_layers for s in self.stacks)

    def stack_of_layer(self) -> list[int]:
        """Index of the stack each flat layer belongs to."""
        return [i for i, s in enumerate(self.stacks) for _ in range(s.num_layers)]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["stacks"] = [s.to_dict() for s in self.stacks]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LMConfig:
        data = {k: v for k, v in data.items() if k not in ("model_type", "architectures")}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)
