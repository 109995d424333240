"""Model factories and loss functions that ``tests/test_model_factory.py`` names by target
(``regrow.tests.model_factories:...``), the way a user names theirs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NOT_CALLABLE = 3


def not_a_module() -> dict:
    """A factory that returns the model's config instead of the model."""
    return {"hidden_size": 64}


class TinyLM(nn.Module):
    """An embedding and a head: ``forward(x)`` returns logits, ``forward(x, y)`` the per-token losses (a
    reduction forgotten: not a scalar)."""

    def __init__(self, vocab_size: int = 256, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(self.embed(x))
        if y is None:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")


def tiny_lm(vocab_size: int = 256, width: int = 16) -> TinyLM:
    return TinyLM(vocab_size, width)


def per_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A user loss function that forgot to reduce (for a model returning logits, or an output with them)."""
    output = model(x)
    return F.cross_entropy(getattr(output, "logits", output).float().transpose(1, 2), y, reduction="none")


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return per_token_loss(model, x, y).mean()
