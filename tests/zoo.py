"""The model zoo (issue 16): tiny versions of the architectures people use, with a data maker and a loss.

One entry per line of :data:`ZOO`: ``ZooEntry(name, make_model, make_data, loss)``. ``make_model()`` builds
the module (seeded), ``make_data(n)`` returns ``(x, y)`` tensors (seeded), ``loss`` is what
:func:`pib_bayes.sample` takes. Used by tests/test_zoo.py and benchmarks/bench_zoo.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

CLASSES = 3


def _classes(x: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, CLASSES, (x.shape[0],), generator=g)


def tabular(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return x, _classes(x, seed)


def images(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, _classes(x, seed)


def sequences(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 6, 4, generator=torch.Generator().manual_seed(seed))
    return x, _classes(x, seed)


VOCAB = 20


def tokens(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, VOCAB, (n, 5), generator=torch.Generator().manual_seed(seed))
    return x, _classes(x, seed)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def cnn_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Dropout(0.2), nn.Flatten(), nn.Linear(4 * 4 * 4, CLASSES))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         BasicBlock(4), BasicBlock(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, CLASSES))


class RNNClassifier(nn.Module):
    """A recurrent layer over the sequence, the last hidden state to a linear head."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(4, 8, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def lstm() -> nn.Module:
    torch.manual_seed(0)
    return RNNClassifier(nn.LSTM)


def gru() -> nn.Module:
    torch.manual_seed(0)
    return RNNClassifier(nn.GRU)


class TransformerClassifier(nn.Module):
    """Input projection, one Transformer encoder layer (with dropout), mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.proj(x)).mean(1))


def transformer() -> nn.Module:
    torch.manual_seed(0)
    return TransformerClassifier()


class BagOfEmbeddings(nn.Module):
    """Token embeddings, mean pooled, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x).mean(1))


def embedding() -> nn.Module:
    torch.manual_seed(0)
    return BagOfEmbeddings()


class Tied(nn.Module):
    """A shared submodule applied twice, and one parameter registered under two names (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 6)
        self.block = nn.Linear(6, 6)
        self.out = nn.Linear(6, 6)
        self.out.weight = self.block.weight  # the same Parameter used by two modules
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.block(torch.tanh(self.block(h))))
        return self.head(torch.tanh(self.out(h)))


def tied() -> nn.Module:
    torch.manual_seed(0)
    return Tied()


class WithBuffers(nn.Module):
    """Input standardisation held in buffers (not sampled), then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 8))
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 8))
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.shift) / self.scale)


def buffers() -> nn.Module:
    torch.manual_seed(0)
    return WithBuffers()


def heteroscedastic(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """y = sin(x_0) + noise whose sd grows with |x_1|: a regression target for (mu, log sigma)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    sd = 0.05 + 0.5 * x[:, 1].abs().clamp(max=1.9)
    return x, (torch.sin(x[:, 0]) + sd * torch.randn(n, generator=g)).unsqueeze(1)


def hetero_mlp() -> nn.Module:
    """Mean and log-std in the last dimension (pib_bayes.HeteroscedasticGaussianLoss)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: its name, a seeded factory, a seeded data maker ``(n) -> (x, y)``, and its loss."""

    name: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[..., tuple[Tensor, Tensor]]
    loss: Any = "cross_entropy"


ZOO: list[ZooEntry] = [
    ZooEntry("mlp", mlp, tabular),
    ZooEntry("cnn_bn_dropout", cnn_bn, images),
    ZooEntry("resnet", resnet, images),
    ZooEntry("lstm", lstm, sequences),
    ZooEntry("gru", gru, sequences),
    ZooEntry("transformer", transformer, sequences),
    ZooEntry("embedding_bag", embedding, tokens),
    ZooEntry("tied_weights", tied, tabular),
    ZooEntry("buffers", buffers, tabular),
    ZooEntry("heteroscedastic_mlp", hetero_mlp, heteroscedastic, "heteroscedastic_gaussian"),
]
