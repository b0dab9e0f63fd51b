"""pib_bayes.data: input checks, per-chain minibatching, the embedded datasets."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pib_bayes.data import (
    LoaderBatcher,
    TensorBatcher,
    as_tensors,
    check_tensors,
    make_classification_data,
    make_regression_data,
)


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_each_epoch_is_a_permutation_of_the_data_and_the_short_batch_is_dropped():
    n, b = 10, 3
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    batcher = TensorBatcher(x, torch.arange(n), b, _gens(0))
    for _ in range(4):  # 3 full batches per epoch (9 of 10 examples), then a fresh permutation
        seen = [batcher.next()[1][0] for _ in range(n // b)]
        ids = torch.cat(seen)
        assert len(set(ids.tolist())) == len(ids) == 9
        assert all(len(s) == b for s in seen)


def test_chains_shuffle_independently_and_a_chain_alone_sees_the_same_batches():
    x, y = torch.randn(20, 2), torch.arange(20)
    both = TensorBatcher(x, y, 4, _gens(1, 2))
    alone = TensorBatcher(x, y, 4, _gens(2))
    for _ in range(7):
        xb, yb, stacked = both.next()
        assert stacked and xb.shape == (2, 4, 2)
        assert torch.equal(yb[1], alone.next()[1][0])
    assert not torch.equal(both.next()[1][0], both.next()[1][1])


def test_next_one_gives_next_s_batch_without_the_chain_dimension():
    x, y = torch.randn(12, 3), torch.arange(12)
    a, b = TensorBatcher(x, y, 5, _gens(7)), TensorBatcher(x, y, 5, _gens(7))
    for _ in range(5):
        xs, ys, _ = a.next()
        x1, y1 = b.next_one()
        assert torch.equal(xs[0], x1) and torch.equal(ys[0], y1)
    with pytest.raises(ValueError, match="^next_one: "):
        TensorBatcher(x, y, 5, _gens(1, 2)).next_one()
    full = TensorBatcher(x, y, None, _gens(0))
    assert full.next_one()[0] is x and full.next() == (x, y, False)


def test_state_dict_resumes_the_exact_batch_sequence():
    x, y = torch.randn(9, 1), torch.arange(9)
    a = TensorBatcher(x, y, 2, _gens(3))
    for _ in range(5):
        a.next()
    state = a.state_dict()
    expected = [a.next()[1] for _ in range(6)]
    b = TensorBatcher(x, y, 2, _gens(99))
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next()[1]) for e in expected)


def test_bad_inputs_get_one_clear_error():
    x, y = torch.randn(5, 2), torch.arange(5)
    with pytest.raises(ValueError, match=r"^batch_size: must be an int in \[1, 5\]"):
        TensorBatcher(x, y, 6, _gens(0))
    with pytest.raises(ValueError, match="^batch_size: "):
        TensorBatcher(x, y, True, _gens(0))
    with pytest.raises(ValueError, match="x has 5 examples but y has 4"):
        check_tensors(x, y[:4])
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_tensors(torch.tensor([[float("nan")]]), torch.zeros(1))
    with pytest.raises(ValueError, match="is empty"):
        check_tensors(torch.zeros(0, 2), torch.zeros(0))
    with pytest.raises(TypeError, match="^data: expected tensors"):
        check_tensors([1.0], torch.zeros(1))
    with pytest.raises(ValueError, match="^data: expected \\(x, y\\)"):
        as_tensors((x, y, y))
    with pytest.raises(TypeError, match="^data: expected"):
        as_tensors({"x": x})


def test_as_tensors_accepts_pairs_and_datasets_but_not_loaders():
    x, y = torch.randn(5, 2), torch.arange(5)
    assert as_tensors((x, y))[0] is x
    assert as_tensors(TensorDataset(x, y))[1] is y
    assert as_tensors(DataLoader(TensorDataset(x, y), batch_size=2)) is None


def test_loader_batcher_cycles_and_refuses_bad_batches():
    x, y = torch.arange(5.0).unsqueeze(1), torch.arange(5)
    batcher = LoaderBatcher(DataLoader(TensorDataset(x, y), batch_size=2))
    got = [batcher.next()[1].tolist() for _ in range(4)]
    assert got == [[0, 1], [2, 3], [4], [0, 1]] and batcher.n == 5
    bad = LoaderBatcher(DataLoader(TensorDataset(x), batch_size=2))
    with pytest.raises(ValueError, match="pair"):
        bad.next()
    empty = LoaderBatcher(DataLoader(TensorDataset(torch.zeros(0, 1), torch.zeros(0)), batch_size=2))
    with pytest.raises(ValueError, match="yields no batches"):
        empty.next()


def test_embedded_datasets_are_deterministic_and_shaped():
    x1, y1 = make_classification_data(n=90, num_classes=3, dim=4, seed=5)
    x2, y2 = make_classification_data(n=90, num_classes=3, dim=4, seed=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (90, 4) and torch.bincount(y1).tolist() == [30, 30, 30]
    assert not torch.equal(make_classification_data(n=90, seed=6)[0], make_classification_data(n=90)[0])
    x, y = make_regression_data(n=40, noise_std=0.0)
    assert x.shape == y.shape == (40, 1)
    torch.testing.assert_close(y, torch.sin(3 * x) + 0.5 * x)  # noise-free: exactly the curve
    assert bool(((x.abs() >= 0.5) & (x.abs() <= 2)).all())  # the gap in (-0.5, 0.5)
    with pytest.raises(ValueError):
        make_classification_data(n=1, num_classes=3)
