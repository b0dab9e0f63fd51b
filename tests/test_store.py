"""The netCDF4/HDF5 posterior file: exact round trips, ArviZ/xarray without pib_bayes, integrity."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pib_bayes import Posterior
from pib_bayes.io import MAGIC, FormatError, save_payload
from pib_bayes.posterior import LEGACY_FORMAT_VERSION
from pib_bayes.store import TRAILER_MAGIC, LazyDraws

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
    idata = az.from_netcdf(path)  # no engine named: xarray recognises the file by its first bytes
    ds = xr.open_dataset(path, group="posterior")
    groups = idata.groups() if callable(idata.groups) else [g[1:] for g in idata.groups if g != "/"]
    print(sorted(groups))  # arviz 0.x: InferenceData.groups(); 1.x: DataTree.groups, paths
    print(dict(ds.sizes))
    print(float(ds["fc.weight"].values.sum()))
    print(idata["sample_stats"]["diverging"].dtype)
    print(az.summary(idata, var_names=["fc.weight"]).shape[0])
    assert "pib_bayes" not in sys.modules and "torch" not in sys.modules
    print("OK", az.__version__)
""")

# The interpreter that reads: this one, or another environment's (CI also runs this test with a
# Python 3.12 venv holding arviz 1.x, xarray, h5netcdf and no torch: .ci/run).
READER_PYTHON = os.environ.get("PIB_BAYES_READER_PYTHON") or sys.executable


def test_arviz_and_xarray_read_the_file_without_pib_bayes(tmp_path):
    w = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    stats = {"energy": torch.randn(2, 5), "diverging": torch.zeros(2, 5, dtype=bool)}
    post = Posterior({"fc.weight": w}, stats, {"task": "regression"}, fixed={"bn.mean": torch.ones(3)})
    post.save(tmp_path / "p.nc")
    (tmp_path / "read.py").write_text(READER)
    r = subprocess.run([READER_PYTHON, str(tmp_path / "read.py"), str(tmp_path / "p.nc")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "['divergences', 'fixed', 'posterior', 'sample_stats']"
    assert lines[1] == "{'chain': 2, 'draw': 5, 'fc.weight_dim_0': 3, 'fc.weight_dim_1': 4}"
    assert float(lines[2]) == float(w.numpy().sum())
    assert lines[3] == "bool" and lines[4] == "12" and lines[5].startswith("OK ")
    print(lines[5])


def test_the_engine_guess_is_what_the_reader_relies_on(tmp_path):
    """The twin of the reader test: xarray picks its engine by the first bytes (HDF5's signature),
    so a file that starts with anything else (format 3's userblock) is not recognised."""
    path = Path(__file__).parent / "data" / "posterior_v3.nc"
    script = ("import sys, xarray as xr\ntry:\n    xr.open_dataset(sys.argv[1], group='posterior')\n"
              "except ValueError as e:\n    print('refused', 'engine' in str(e) or 'backend' in str(e))\n")
    r = subprocess.run([READER_PYTHON, "-c", script, str(path)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "refused True"


def _data_chunk_offset(path, group, name, index):
    with h5py.File(path, "r") as f:
        info = f[group][name].id.get_chunk_info(index)
    return info.byte_offset, info.size


@pytest.mark.parametrize("where", [0, 7, -1])  # the chunk's first byte, one inside, its last
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
    the chunks' XXH3-64 digests): always one FormatError naming the file, nothing else."""
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
    with pytest.raises(FormatError, match="bytes appended"):
        Posterior.load(bad)
    n = int(raw[-32:-16], 16) + 32  # the trailer: its JSON, its length, the magic; a byte inserted before
    bad.write_bytes(raw[:-n] + b"\0" + raw[-n:])
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


def _v2_expected():
    """The tensors tests/data/posterior_v2.nc was written from (by the format-2 writer, pib_bayes main
    of 2026-12-01: fletcher32 chunks)."""
    g = torch.Generator().manual_seed(0)
    draws = {"fc.weight": torch.randn(2, 5, 3, generator=g),
             "fc.bias": torch.randn(2, 5, generator=g).to(torch.bfloat16)}
    return draws, torch.randn(2, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("lazy", [False, True])
def test_version_2_files_still_load(lazy):
    draws, energy = _v2_expected()
    path = __import__("pathlib").Path(__file__).parent / "data" / "posterior_v2.nc"
    with h5py.File(path, "r") as f:  # really the old layout: HDF5's fletcher32 filter on the chunks
        assert f["posterior"]["fc.weight"].fletcher32
    post = Posterior.load(path, lazy=lazy)
    for name, t in draws.items():
        assert post.draws[name].dtype == t.dtype and torch.equal(post.draws[name], t)
    assert torch.equal(post.sample_stats["energy"], energy) and post.metadata["seed"] == 0
    assert int(post.fixed["bn.n"]) == 7
    if lazy:
        assert torch.equal(post.draws.read("fc.weight", [1], slice(1, 4)), draws["fc.weight"][[1], 1:4])


@pytest.mark.parametrize("lazy", [False, True])
def test_version_3_files_still_load(lazy):
    """tests/data/posterior_v3.nc: the same tensors as the version-2 file, written by the format-3
    writer (pib_bayes main 14eb777: the structure record in an HDF5 userblock before the HDF5 bytes)."""
    draws, energy = _v2_expected()
    path = __import__("pathlib").Path(__file__).parent / "data" / "posterior_v3.nc"
    raw = path.read_bytes()
    assert raw.startswith(b"PIBBAYES-NETCDF\n") and not raw.endswith(TRAILER_MAGIC)  # really format 3
    post = Posterior.load(path, lazy=lazy)
    for name, t in draws.items():
        assert post.draws[name].dtype == t.dtype and torch.equal(post.draws[name], t)
    assert torch.equal(post.sample_stats["energy"], energy) and post.metadata["seed"] == 0
    assert int(post.fixed["bn.n"]) == 7
    flipped = bytearray(raw)
    flipped[len(b"PIBBAYES-NETCDF\n") + 3] ^= 0x01  # inside its userblock record
    bad = __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "v3.nc"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(FormatError, match="userblock"):
        Posterior.load(bad)


def _small_chunked_file(tmp_path, monkeypatch):
    """Draws in many chunks: CHUNK_BYTES = 80 makes the (3, 7, 2, 5) float32 variable 2 draws a chunk
    (the last chunk of each chain an edge chunk), and the (3, 7, 40) float64 one a quarter draw."""
    monkeypatch.setattr("pib_bayes.store.CHUNK_BYTES", 80)
    g = torch.Generator().manual_seed(3)
    draws = {"a": torch.randn(3, 7, 2, 5, generator=g), "b": torch.randn(3, 7, 40, generator=g).double(),
             "c": torch.rand(3, 7, generator=g) > 0.5,
             "d": torch.randn(3, 7, 3, generator=g).to(torch.bfloat16)}
    path = tmp_path / "p.nc"
    Posterior(draws, {"energy": torch.randn(3, 7, generator=g)}, {"task": "regression"}).save(path)
    return path, draws


def test_a_lazily_loaded_posterior_gives_the_draws_of_an_eager_one(tmp_path, monkeypatch):
    path, draws = _small_chunked_file(tmp_path, monkeypatch)
    eager, lazy = Posterior.load(path), Posterior.load(path, lazy=True)
    assert isinstance(lazy.draws, LazyDraws) and lazy.draws.names == list(draws)
    for name, t in draws.items():
        assert lazy.draws.shape(name) == tuple(t.shape) and lazy.draws.dtype(name) == t.dtype
        assert torch.equal(lazy.draws[name], eager.draws[name]) and torch.equal(lazy.draws[name], t)
    assert torch.equal(lazy.sample_stats["energy"], eager.sample_stats["energy"])


@settings(max_examples=60, deadline=None)
@given(chains=st.one_of(st.lists(st.integers(0, 2), min_size=1, max_size=4),
                        st.tuples(st.integers(0, 3), st.integers(0, 3)).map(lambda t: slice(*t))),
       start=st.integers(0, 8), stop=st.integers(0, 8), step=st.integers(1, 3))
def test_lazy_reads_of_any_selection_equal_slicing(tmp_path_factory, chains, start, stop, step):
    with pytest.MonkeyPatch.context() as mp:
        path, draws = _small_chunked_file(tmp_path_factory.mktemp("lazy"), mp)
    lazy = LazyDraws(path)
    for name, t in draws.items():
        got = lazy.read(name, chains, slice(start, stop, step))
        want = t[chains][:, start:stop:step]
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name


def test_a_lazy_read_checks_only_the_chunks_it_reads(tmp_path, monkeypatch):
    path, draws = _small_chunked_file(tmp_path, monkeypatch)
    off, size = _data_chunk_offset(path, "posterior", "a", 1)  # chain 0, draws 2:4
    raw = bytearray(path.read_bytes())
    raw[off + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    lazy = LazyDraws(path)
    assert torch.equal(lazy.read("a", [0], slice(0, 2)), draws["a"][[0], 0:2])  # chunk 0 only: fine
    assert torch.equal(lazy.read("a", [1, 2], slice(None)), draws["a"][1:])
    with pytest.raises(FormatError, match=r"p\.nc: variable posterior/a: the chunk at \[0:1, 2:4, 0:2, 0:5\] "
                                          r"is corrupt \(XXH3-64 digest mismatch\)"):
        lazy.read("a", [0], slice(3, 4))
    with pytest.raises(FormatError, match="the chunk at"):
        Posterior.load(path)


def test_chunks_are_contiguous_slabs_of_one_chain(tmp_path, monkeypatch):
    path, _ = _small_chunked_file(tmp_path, monkeypatch)
    with h5py.File(path, "r") as f:
        assert f["posterior"]["a"].chunks == (1, 2, 2, 5)  # 2 draws of 40 bytes in 80
        assert f["posterior"]["b"].chunks == (1, 1, 10)  # a draw of 320 bytes: 10 float64 a chunk
        assert f["posterior"]["c"].chunks == (1, 7) and not f["posterior"]["a"].fletcher32


@pytest.mark.parametrize("same_path", [False, True])
def test_a_lazily_loaded_posterior_saves_chunk_by_chunk_to_the_same_file(tmp_path, monkeypatch, same_path):
    path, draws = _small_chunked_file(tmp_path, monkeypatch)
    lazy = Posterior.load(path, lazy=True)
    calls = []
    real = LazyDraws.source
    monkeypatch.setattr(LazyDraws, "source", lambda self, n: calls.append(n) or real(self, n))
    target = path if same_path else tmp_path / "copy.nc"
    lazy.save(target)
    assert calls == list(draws)  # every variable copied through its chunks, none materialised
    back = Posterior.load(target)
    for name, t in draws.items():
        assert torch.equal(back.draws[name], t), name
    if not same_path:
        assert target.read_bytes() == path.read_bytes()  # the same layout, digests and bytes


def test_a_file_of_many_chunks_whose_trailer_is_long_loads(tmp_path, monkeypatch):
    """A store of thousands of chunks has a trailer (chunk ranges) of hundreds of KiB (the 16 GB
    out-of-core run: about 512 KiB); it loads, and a flipped separator deep inside it is caught."""
    monkeypatch.setattr("pib_bayes.store.CHUNK_BYTES", 16)
    draws = {"w": torch.randn(2, 3000, 4, generator=torch.Generator().manual_seed(0))}  # 6000 chunks
    path = tmp_path / "many.nc"
    Posterior(draws, {"energy": torch.zeros(2, 3000)}, {"task": "regression"}).save(path)
    raw = bytearray(path.read_bytes())
    assert raw.endswith(TRAILER_MAGIC)
    n = int(raw[-32:-16], 16)
    assert n > 65536  # the case the test is about
    assert torch.equal(Posterior.load(path).draws["w"], draws["w"])
    assert torch.equal(Posterior.load(path, lazy=True).draws["w"], draws["w"])
    start = len(raw) - 32 - n
    pos = start + 70000 + raw[start + 70000:].index(b",")  # a separator of the chunk ranges, past 64 KiB
    raw[pos] = ord(";")
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="corrupt trailer"):
        Posterior.load(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_load_flags_the_chains_holding_nan_or_inf_found_while_reading(tmp_path, monkeypatch, dtype):
    """The chunks are scanned for NaN/Inf as they are read (Posterior does not scan them again): a
    chain with one NaN or Inf in any chunk is flagged; a chain of large finite values whose chunk
    sum overflows is not; chunks of 2 draws (CHUNK_BYTES = 32 with 4 weights): the bad values sit
    in the last, an edge chunk, and a middle one."""
    monkeypatch.setattr("pib_bayes.store.CHUNK_BYTES", 8 * torch.empty((), dtype=dtype).element_size())
    w = torch.ones(4, 5, 4, dtype=dtype)
    w[1, 4, 2] = float("nan")  # the edge chunk (draw 4 of 5)
    w[2, 2, 0] = -float("inf")
    w[3] = torch.finfo(dtype).max  # finite, but its sums overflow
    path = tmp_path / "post.nc"
    with pytest.warns(UserWarning, match="not flagged"):
        post = Posterior({"w": w}, {}, {"task": "regression"})
    post.diverged = torch.zeros(4, dtype=torch.bool)  # a file whose flags do not say so
    post.save(path)
    with pytest.warns(UserWarning, match=r"draws: chains \[1, 2\] hold NaN/Inf draws"):
        post = Posterior.load(path)
    assert post.diverged.tolist() == [False, True, True, False]
    assert torch.equal(_bits(post.draws["w"]), _bits(w))
    post.draws["w"][0, 0, 0] = float("nan")  # changed after the load: a new Posterior scans again
    with pytest.warns(UserWarning, match=r"draws: chains \[0, 1, 2\] hold NaN/Inf draws"):
        Posterior(post.draws, {}, {"task": "regression"})
    lazy = Posterior.load(path, lazy=True)  # the same flags once scanned
    with pytest.warns(UserWarning, match=r"draws: chains \[1, 2\] hold NaN/Inf draws"):
        assert lazy.check_finite() == [1, 2]


def test_the_writer_records_the_chains_with_nonfinite_draws_and_a_load_trusts_it(tmp_path, monkeypatch):
    """Format 4: each float posterior variable carries the chains the writer found holding a NaN or
    an infinity (pib_bayes_nonfinite_chains, covered by the structure digest, describing chunks
    checked by their own digests), so a full load need not test every value again; the Posterior
    still holds such a chain flagged. Twin: a format-3 file has no record, and its load scans the chunks."""
    import pib_bayes.store as store

    w = torch.randn(3, 4, 5)
    w[1, 2, 3] = float("nan")
    with pytest.warns(UserWarning, match=r"chains \[1\] hold NaN/Inf draws"):
        Posterior({"w": w, "b": torch.randn(3, 4)}, {}, {"task": "regression"}).save(tmp_path / "p.nc")
    with h5py.File(tmp_path / "p.nc", "r") as f:
        assert f["posterior"]["w"].attrs["pib_bayes_nonfinite_chains"] == "[1]"
        assert f["posterior"]["b"].attrs["pib_bayes_nonfinite_chains"] == "[]"
    calls = []
    real = store._finite
    monkeypatch.setattr(store, "_finite", lambda a: calls.append(a.size) or real(a))
    post = Posterior.load(tmp_path / "p.nc")  # flagged when it was saved: no warning now
    assert calls == [] and post.diverged.tolist() == [False, True, False]
    assert torch.equal(post.draws["w"].isnan(), w.isnan())
    Posterior.load(Path(__file__).parent / "data" / "posterior_v3.nc")  # the twin: no record, a scan
    assert calls


@pytest.mark.parametrize("raw, expected", [
    (None, None), ("[]", set()), ("[1]", {1}), (b"[0, 1]", {0, 1}), ("[2]", FormatError),
    ("[-1]", FormatError), ("[true]", FormatError), ("{}", FormatError), ("[", FormatError),
    (7, FormatError)])
def test_the_nonfinite_record_is_read_strictly(raw, expected):
    """A record that is not a JSON list of chain indices of the variable (here 2 chains) is a
    FormatError naming the file and the variable (a file would need valid digests to get here)."""
    from types import SimpleNamespace

    from pib_bayes.store import _nonfinite_record

    attrs = {} if raw is None else {"pib_bayes_nonfinite_chains": raw}
    ds = SimpleNamespace(shape=(2, 3, 4))
    if expected is FormatError:
        with pytest.raises(FormatError, match=r"p\.nc: variable posterior/w: corrupt attribute"):
            _nonfinite_record(Path("p.nc"), "posterior", "w", ds, attrs)
    else:
        assert _nonfinite_record(Path("p.nc"), "posterior", "w", ds, attrs) == expected
