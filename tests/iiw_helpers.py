"""Models and problems the IIW tests share."""

from __future__ import annotations

import torch
from torch import nn

F64 = torch.float64


def tiny_classifier(n: int = 128, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 4-16-3 tanh MLP (float64, seeded) and n examples of 3 classes from a fixed rule of 4 inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=F64)
    y = (x[:, :1] - 2 * x[:, 1:2] > 0).long().squeeze(1) + (x[:, 2] > 1).long()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    return net, x, y


class PaddedBag(nn.Module):
    """Mean of token embeddings (row 0 the padding row: zero gradient) into a linear head, 3 classes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.embed(x).mean(1))
