"""The text-only front-end: token embeddings."""

from __future__ import annotations

import torch
from torch import nn


class TextFrontEnd(nn.Module):
    """Token embeddings only.

    Args:
        config: the model's :class:`~mmdistill.lm_config.LMConfig` (``vocab_size``,
            ``hidden_size``).
    """

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pixel_values is not None:
            raise ValueError("this model has a text-only front-end; it cannot take pixel_values")
        return self.embed_tokens(input_ids)

    def token_embeddings(self) -> nn.Embedding:
        return self.embed_tokens
