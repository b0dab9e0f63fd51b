"""The netCDF4/HDF5 posterior file: exact round trips, ArviZ/xarray without pib_bayes, integrity."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pib_bayes import Posterior
from pib_bayes.io import MAGIC, FormatError, save_payload
from pib_bayes.posterior import LEGACY_FORMAT_VERSION

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
          torch.bool]


def _values(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 200, shape, generator=g).to(dtype)
    v = (torch.randn(shape, generator=g) * 1e3).to(dtype)
    if v.numel():
        v.view(-1)[0] = float("nan")
    return v


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), chains=st.integers(1, 3), draws=st.integers(1, 4),
       shape=st.lists(st.integers(0, 4), max_size=3), scalar_fixed=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact_for_every_dtype_and_shape(tmp_path_factory, dtype, chains, draws, shape,
                                                       scalar_fixed, seed):
    post = Posterior({"layer.w": _values((chains, draws, *shape), dtype, seed)},
                     {"energy": _values((chains, draws), torch.float64, seed + 1),
                      "diverging": _values((chains, draws), torch.bool, seed + 2)},
                     {"task": "regression", "nested": {"a": [1, 2.5, None]}},
                     fixed=({"bn.n": torch.tensor(7)} if scalar_fixed
                            else {"bn.m": _values(shape, dtype, seed)}))
    path = tmp_path_factory.mktemp("rt") / "p.nc"
    post.save(path)
    back = Posterior.load(path)
    for a, b in ((post.draws, back.draws), (post.sample_stats, back.sample_stats), (post.fixed, back.fixed)):
        assert list(a) == list(b)
        for k in a:  # bit-exact, NaN payloads included
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            if a[k].dtype.is_floating_point:
                assert torch.equal(_bits(a[k]), _bits(b[k])), k
            else:
                assert torch.equal(a[k], b[k]), k
    assert back.metadata == post.metadata and torch.equal(back.diverged, post.diverged)


def test_unstorable_dtype_is_refused_clearly(tmp_path):
    post = Posterior({"w": torch.zeros(1, 2, 3, dtype=torch.complex64)}, {}, {"task": "regression"})
    with pytest.raises(ValueError, match=r"posterior\['w'\]: dtype torch.complex64 cannot be stored"):
        post.save(tmp_path / "p.nc")
    assert not (tmp_path / "p.nc").exists() and not list(tmp_path.iterdir())


READER = textwrap.dedent("""
    import sys
    import arviz as az
    import xarray as xr
    path = sys.argv[1]
    idata = az.from_netcdf(path)
    ds = xr.open_dataset(path, group="posterior", engine="h5netcdf")
    print(sorted(idata.groups()))
    print(dict(ds.sizes))
    print(float(ds["fc.weight"].values.sum()))
    print(idata.sample_stats["diverging"].dtype)
    assert "pib_bayes" not in sys.modules and "torch" not in sys.modules
    print("OK")
""")


def test_arviz_and_xarray_read_the_file_without_pib_bayes(tmp_path):
    w = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    stats = {"energy": torch.randn(2, 5), "diverging": torch.zeros(2, 5, dtype=bool)}
    post = Posterior({"fc.weight": w}, stats, {"task": "regression"}, fixed={"bn.mean": torch.ones(3)})
    post.save(tmp_path / "p.nc")
    (tmp_path / "read.py").write_text(READER)
    r = subprocess.run([sys.executable, str(tmp_path / "read.py"), str(tmp_path / "p.nc")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "['divergences', 'fixed', 'posterior', 'sample_stats']"
    assert lines[1] == "{'chain': 2, 'draw': 5, 'fc.weight_dim_0': 3, 'fc.weight_dim_1': 4}"
    assert float(lines[2]) == float(w.numpy().sum())
    assert lines[3] == "bool" and lines[4] == "OK"


def _data_chunk_offset(path, group, name, index):
    with h5py.File(path, "r") as f:
        info = f[group][name].id.get_chunk_info(index)
    return info.byte_offset, info.size


@pytest.mark.parametrize("where", [0, 7, -5])  # the chunk's first byte, one inside, one in its fletcher32 sum
def test_a_flipped_byte_in_a_data_chunk_names_the_file_the_variable_and_the_chunk(tmp_path, monkeypatch,
                                                                                   where):
    monkeypatch.setattr("pib_bayes.store.CHUNK_BYTES", 48)  # chunks of one chain's 3 draws x 4 floats
    path = tmp_path / "p.nc"
    w = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    Posterior({"fc.weight": w, "fc.bias": torch.ones(2, 3)}, {}, {"task": "regression"}).save(path)
    off, size = _data_chunk_offset(path, "posterior", "fc.weight", 1)
    raw = bytearray(path.read_bytes())
    assert raw[off:off + 4] == np.float32(12).tobytes()  # the chunk found is this variable's second chain
    raw[off + (where % size)] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"p\.nc: variable posterior/fc\.weight: "
                                          r"the chunk at \[1:2, 0:3, 0:4\] is corrupt"):
        Posterior.load(path)


def test_any_flipped_byte_is_a_format_error_never_a_different_posterior(tmp_path):
    """Every byte of a small file flipped in turn (the structure by its blake2b digest, the data by
    the chunks' fletcher32 sums): always one FormatError naming the file, nothing else."""
    path = tmp_path / "p.nc"
    Posterior({"w": torch.randn(2, 3, 2)}, {"energy": torch.randn(2, 3)}, {"task": "regression"}).save(path)
    raw = path.read_bytes()
    bad = tmp_path / "bad.nc"
    for pos in range(0, len(raw), 7):  # a fixed stride over the whole file (about 2,000 positions)
        flipped = bytearray(raw)
        flipped[pos] ^= 0xA5
        bad.write_bytes(bytes(flipped))
        with pytest.raises(FormatError, match=r"bad\.nc"):
            Posterior.load(bad)


def test_truncated_or_appended_files_are_format_errors(tmp_path):
    path = tmp_path / "p.nc"
    Posterior({"w": torch.randn(2, 3, 2)}, {}, {"task": "regression"}).save(path)
    raw = path.read_bytes()
    bad = tmp_path / "bad.nc"
    for cut in (0, 10, 600, len(raw) // 2, len(raw) - 1):
        bad.write_bytes(raw[:cut])
        with pytest.raises(FormatError):
            Posterior.load(bad)
    bad.write_bytes(raw + b"\0")
    with pytest.raises(FormatError, match="size mismatch"):
        Posterior.load(bad)


def test_a_foreign_hdf5_file_is_a_format_error(tmp_path):
    with h5py.File(tmp_path / "x.nc", "w") as f:
        f["a"] = np.arange(3)
    with pytest.raises(FormatError, match="not a pib_bayes file"):
        Posterior.load(tmp_path / "x.nc")


def test_files_of_the_old_format_load_read_only_with_a_deprecation_warning(tmp_path):
    w = torch.randn(2, 3, 4)
    payload = {"draws": {"w": w}, "sample_stats": {}, "fixed": {},
               "diverged": torch.zeros(2, dtype=torch.bool), "divergence_step": torch.full((2,), -1),
               "metadata_json": '{"task": "regression"}'}
    save_payload(tmp_path / "old.pib", "posterior", LEGACY_FORMAT_VERSION, payload)
    assert (tmp_path / "old.pib").read_bytes().startswith(MAGIC)
    with pytest.warns(DeprecationWarning, match="read-only.*save\\(\\) it again"):
        post = Posterior.load(tmp_path / "old.pib")
    assert torch.equal(post.draws["w"], w)
    post.save(tmp_path / "new.nc")  # rewritten in the current format, which loads without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(Posterior.load(tmp_path / "new.nc").draws["w"], w)
