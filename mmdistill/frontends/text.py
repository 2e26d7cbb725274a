"""The text-only front-end: token embeddings."""

from __future__ import annotations

import torch
from torch import nn


class TextFrontEnd(nn.Module):
    """Token embeddings only, multiplied by ``front_end["embedding_scale"]`` when the config
    gives one (Gemma: ``sqrt(hidden_size)``, rounded to the weights' dtype first, as Gemma does).

    Args:
        config: the model's :class:`~mmdistill.lm_config.LMConfig` (``vocab_size``,
            ``hidden_size``, ``front_end``).
    """

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.scale = config.front_end.get("embedding_scale")

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pixel_values is not None:
            raise ValueError("this model has a text-only front-end; it cannot take pixel_values")
        x = self.embed_tokens(input_ids)
        if self.scale is None:
            return x
        return x * torch.tensor(self.scale, dtype=x.dtype)

    def token_embeddings(self) -> nn.Embedding:
        return self.embed_tokens
