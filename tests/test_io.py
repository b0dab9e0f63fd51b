"""pib_bayes.io: versioned, checksummed, atomically written payload files."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from pib_bayes import Posterior
from pib_bayes.io import MAGIC, FormatError, atomic_write_bytes, load_payload, save_payload


def _save(tmp_path, **kw):
    path = tmp_path / "thing.pib"
    payload = {"w": torch.arange(6.0).reshape(2, 3), "names": ["a", "b"], "n": 3, "x": 0.5}
    save_payload(path, kw.get("kind", "posterior"), kw.get("version", 2), payload)
    return path, payload


def test_round_trip_keeps_every_value(tmp_path):
    path, payload = _save(tmp_path)
    got = load_payload(path, "posterior", (1, 2))
    assert torch.equal(got["w"], payload["w"]) and got["names"] == ["a", "b"] and got["n"] == 3
    assert got["x"] == 0.5
    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    header = json.loads(raw[len(MAGIC):raw.index(b"\n", len(MAGIC))])
    assert header["kind"] == "posterior" and header["format_version"] == 2


def test_wrong_kind_and_unsupported_version_are_format_errors(tmp_path):
    path, _ = _save(tmp_path)
    with pytest.raises(FormatError, match="holds a 'posterior', expected a 'checkpoint'"):
        load_payload(path, "checkpoint", (2,))
    with pytest.raises(FormatError, match="format version 2 is not supported"):
        load_payload(path, "posterior", (1,))


def test_truncation_bit_flip_and_foreign_files_are_detected(tmp_path):
    path, _ = _save(tmp_path)
    raw = path.read_bytes()
    (tmp_path / "cut.pib").write_bytes(raw[:-10])
    with pytest.raises(FormatError, match="checksum mismatch"):
        load_payload(tmp_path / "cut.pib", "posterior", (2,))
    flipped = bytearray(raw)
    flipped[-5] ^= 0x01
    (tmp_path / "flip.pib").write_bytes(bytes(flipped))
    with pytest.raises(FormatError, match="checksum mismatch"):
        load_payload(tmp_path / "flip.pib", "posterior", (2,))
    (tmp_path / "other.bin").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(FormatError, match="bad magic"):
        load_payload(tmp_path / "other.bin", "posterior", (2,))
    edited = raw.replace(b'"format_version": 2', b'"format_version":2', 1)
    (tmp_path / "edit.pib").write_bytes(edited)
    with pytest.raises(FormatError, match="corrupt header"):
        load_payload(tmp_path / "edit.pib", "posterior", (2,))
    with pytest.raises(FileNotFoundError, match="^path: no file"):
        load_payload(tmp_path / "missing.pib", "posterior", (2,))


def test_a_format_error_is_a_value_error():
    assert issubclass(FormatError, ValueError)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_pickled_code_in_a_payload_does_not_run(tmp_path):
    # weights_only loading: an object that would run code on unpickling is refused, not executed
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "ran"),))

    path = tmp_path / "evil.pib"
    save_payload(path, "posterior", 2, {"x": Evil()})
    with pytest.raises(FormatError):
        load_payload(path, "posterior", (2,))
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_get_the_mode_a_plain_open_gives_not_mkstemps_private_one(tmp_path, umask, expected):
    """A posterior saved into a shared folder is readable as the umask allows (a plain ``open``'s
    0666 & ~umask), not 0600 as the temporary file it is renamed from (the 0o022 case would fail
    on a private file); overwriting keeps the mode the old file had."""
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        Posterior({"w": torch.zeros(1, 2, 3)}, {}, {"task": "regression"}).save(tmp_path / "p.nc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == expected
    assert stat.S_IMODE(os.stat(tmp_path / "p.nc").st_mode) == expected
    os.chmod(tmp_path / "p.nc", 0o604)
    Posterior({"w": torch.ones(1, 2, 3)}, {}, {"task": "regression"}).save(tmp_path / "p.nc")
    assert stat.S_IMODE(os.stat(tmp_path / "p.nc").st_mode) == 0o604
