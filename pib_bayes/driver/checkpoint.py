"""Checkpoints of a run: fingerprints of what identifies it, the state of a chain group, resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import FormatError, load_payload, save_payload
from ..samplers.core import SCRATCH, STEP
from .chains import (
    _Group,
)
from .recorder import _Buffers, _Cursor
from .stream import segments_dir

# 3: the fingerprints derived from the run's metadata (run_fingerprint); 2: draws in segments (appended);
# 1: every draw in the payload. Versions 1 and 2 are refused (their fingerprints were built beside the
# metadata: this version cannot check them against a run)
CHECKPOINT_VERSION = 3

# metadata that does not identify a run (what wrote it, why a method was chosen, settings that give the
# same numbers, results of the run itself): every other metadata field is part of the fingerprint
NOT_IDENTIFYING = ("library", "version", "chain_method_reason", "prefetch_noise", "loss", "step_size_auto",
                   "gradient_noise", "sampler_auto", "control_variate")


def run_fingerprint(metadata: dict[str, Any], hashes: dict[str, Any]) -> str:
    """What identifies a run, as a canonical JSON string: its ``metadata`` (a
    :class:`~pib_bayes.Posterior`'s, as known before it samples) less :data:`NOT_IDENTIFYING`, with
    ``hashes`` (the data's and the initial weights' digests, :func:`data_fingerprint`,
    :func:`tensor_fingerprint`) added. A new metadata field is part of it unless listed there: the
    fingerprint and the metadata cannot disagree.

    >>> meta = {"version": "0.2", "beta": 0.1, "seed": 0}
    >>> run_fingerprint(meta, {"data": "ab12"})
    '{"beta": 0.1, "data": "ab12", "seed": 0}'
    >>> newer = {**meta, "version": "0.3"}
    >>> run_fingerprint(newer, {"data": "ab12"}) == run_fingerprint(meta, {"data": "ab12"})
    True
    """
    identity = {k: v for k, v in metadata.items() if k not in NOT_IDENTIFYING}
    return json.dumps({**identity, **hashes}, sort_keys=True, default=str)


def _diverging_from(stats: dict[str, Tensor], num_draws: int) -> Tensor:
    """Per chain, the first draw flagged ``diverging`` (num_draws if none): the flag is set from a
    chain's divergence to its last draw, so this index restores it."""
    d = stats["diverging"]
    none = torch.full_like(d[:, 0], num_draws, dtype=torch.long)
    return torch.where(d.any(1), d.to(torch.uint8).argmax(1), none)


class _Checkpointer:
    """Checkpoints of a whole run (see :func:`sample`'s ``checkpoint``).

    A checkpoint appends the draws kept since the previous one as a segment
    (:mod:`pib_bayes.driver.stream`), then writes atomically the small payload: the group state,
    the draws committed per chain group, the divergence flags. It holds two fingerprints, both
    :func:`run_fingerprint` of the run's metadata: ``setup`` (the metadata as the arguments give it,
    known before the model runs: ``chain_method`` as asked, ``schedule`` the requested step size)
    and ``fingerprint`` (the metadata as the run resolved it: chain method, automatic step size).
    Resuming compares both; a finished run (``finished``, with its metadata) is handed back by
    :func:`sample` without sampling again."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, setup: str, out: _Buffers,
                 every: int, store: str | None = None, hooks: dict[str, Any] | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every: must be an int >= 1 (steps), got {every!r}")
        self.path, self.fingerprint, self.setup, self.out, self.store = path, fingerprint, setup, out, store
        # the run's warm-up stages shared by every group (AutoStep's adapter, the noise report):
        # objects with state_dict()/load_state_dict(), or None
        self.hooks = {k: v for k, v in (hooks or {}).items() if v is not None}

    def write(self, group_index: int, group_state: dict[str, Any] | None,
              metadata: dict[str, Any] | None = None, group: _Group | None = None) -> None:
        if group is not None and group_state is not None:
            self.out.flush(group, int(group_state["kept"]))  # the new draws first, then the record of them
        assert self.out.segments is not None
        num_draws = next(iter(self.out.stats.values())).shape[1]
        save_payload(self.path, "checkpoint", CHECKPOINT_VERSION, {
            "checkpoint_version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint, "setup": self.setup, "group_index": group_index,
            "group_state": group_state, "committed": dict(self.out.segments.kept),
            "stat_names": list(self.out.stats), "diverging_from": _diverging_from(self.out.stats, num_draws),
            "diverged": self.out.diverged, "divergence_step": self.out.divergence_step, "store": self.store,
            "hooks": {k: h.state_dict() for k, h in self.hooks.items()},
            **({"finished": True, "metadata_json": json.dumps(metadata, default=str)}
               if metadata is not None else {}),
        })

    def saver(self, group_index: int) -> Callable[[_Group, _Cursor], None]:
        return lambda group, cursor: self.write(group_index, _group_state(group, cursor), group=group)

    @staticmethod
    def read(path: str | os.PathLike | None, setup: str) -> dict[str, Any] | None:
        """The checkpoint at ``path`` if there is one, after checking it comes from this run."""
        if path is None or not os.path.exists(path):
            return None
        saved = load_payload(path, "checkpoint", (CHECKPOINT_VERSION, 2, 1))
        if saved.get("checkpoint_version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint: {str(path)!r} is a checkpoint of an older pib_bayes (version 1 "
                             f"or 2; this one writes version {CHECKPOINT_VERSION}, whose fingerprint is "
                             "derived from the run's metadata), so it cannot be checked against this run; "
                             "finish that run with the pib_bayes that wrote it, or pass resume=False "
                             "(pib-bayes sample: leave out --resume) to start over")
        if not isinstance(saved.get("setup"), str):
            raise ValueError(f"resume: the checkpoint {str(path)!r} predates the check that it comes from "
                             "the same data and initial weights (written by pib_bayes <= 0.2), so it "
                             "cannot be resumed safely; use resume=False to start over")
        _check_same_run(path, saved["setup"], setup)
        return saved

    @staticmethod
    def restore(path: str | os.PathLike, out: _Buffers, saved: dict[str, Any]) -> None:
        """Fill ``out`` (statistics, divergence flags; the draws too when held in memory) from a
        checkpoint and its segments, and drop the segments it does not commit."""
        try:
            out.diverged.copy_(saved["diverged"])
            out.divergence_step.copy_(saved["divergence_step"])
            assert out.segments is not None
            out.segments.start({int(k): int(v) for k, v in saved["committed"].items()})
            for name in saved["stat_names"]:
                out.stat(name)
            for seg in out.segments.written:
                info = out.segments.info(seg)
                assert info is not None
                chains, k0, k1 = info
                draws, stats = out.segments.read(seg)
                for name, v in stats.items():
                    out.stat(name)[chains, k0:k1] = v
                if not out.window:
                    for name, v in draws.items():
                        out.draws[name][chains, k0:k1] = v
            for c, k in enumerate(saved["diverging_from"].tolist()):
                out.stats["diverging"][c, k:] = True
        except (KeyError, IndexError, TypeError, RuntimeError) as err:
            raise FormatError(f"{path}: incomplete checkpoint ({err})") from None

    def resume(self, groups: list[_Group], saved: dict[str, Any]) -> tuple[int, _Cursor | None]:
        _check_same_run(self.path, saved.get("fingerprint", "{}"), self.fingerprint)
        self.restore(self.path, self.out, saved)
        try:
            gi = int(saved["group_index"])
            for k, h in self.hooks.items():
                h.load_state_dict(saved["hooks"][k])
            cursor = _restore_group(groups[gi], saved["group_state"]) if saved["group_state"] else None
        except (KeyError, IndexError, TypeError, RuntimeError) as err:
            raise FormatError(f"{self.path}: incomplete checkpoint ({err})") from None
        return gi, cursor


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint: its payload file and its segments (``.NAME.segments/``)."""
    Path(path).unlink(missing_ok=True)
    shutil.rmtree(segments_dir(path), ignore_errors=True)


# the fingerprint's keys (metadata fields, hashes) as the arguments that set them
_FINGERPRINT_LABELS = {
    "initial_weights": "initial weights", "n": "data (number of examples)",
    "schedule": "schedule (step_size)",
    "sampler_settings": "sampler settings (sampler_kwargs)", "sampled_params": "sampled parameters (params)",
    "kept_params": "kept parameters (keep)",
}


def _check_same_run(path: str | os.PathLike, stored: str, current: str) -> None:
    if stored == current:
        return
    try:
        old = json.loads(stored)
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise FormatError(f"{path}: corrupt checkpoint fingerprint") from None
    new = json.loads(current)
    if not isinstance(old, dict):
        raise FormatError(f"{path}: corrupt checkpoint fingerprint")
    diff = sorted(_FINGERPRINT_LABELS.get(k, k) for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise ValueError(f"resume: the checkpoint {str(path)!r} comes from a different run ({', '.join(diff)} "
                     "differ); use the same arguments, data and initial weights, or resume=False to start "
                     "over")


ROWS_HASHED = 4096  # data rows hashed by data_fingerprint (evenly spaced; all rows of smaller data)


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_fingerprint(tensors: Sequence[Tensor]) -> str:
    """blake2b hex digest of the shapes, dtypes and bytes of ``tensors`` (in order)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def data_fingerprint(tensors: Sequence[Tensor] | None) -> str | None:
    """blake2b digest of the data tensors' shapes and dtypes and of at most :data:`ROWS_HASHED`
    evenly spaced rows (every row of smaller data): cheap on any data size, and two data sets of one
    shape differ in the hashed rows unless they agree on every one of them. None: data that is not
    tensors (a DataLoader over another dataset) is not fingerprinted."""
    if tensors is None:
        return None
    n = int(tensors[0].shape[0])
    idx = torch.linspace(0, n - 1, ROWS_HASHED).round().long().unique() if n > ROWS_HASHED else None
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{n}|".encode())
    for t in tensors:
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_bytes(t if idx is None else t.detach().cpu().index_select(0, idx)))
    return h.hexdigest()


def _loader_tensors(data: object) -> tuple[Tensor, ...] | None:
    ds = getattr(data, "dataset", None)
    return tuple(ds.tensors) if isinstance(ds, torch.utils.data.TensorDataset) else None


def _loader_length(data: object) -> int | None:
    try:
        return len(data.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


def _group_state(group: _Group, cur: _Cursor) -> dict[str, Any]:
    return {
        # t: the group's one step counter (its state's STEP); the collected-step count is derived from it
        "t": cur.t, "kept": cur.kept, "alive": cur.alive.clone(),
        "energy_limit": None if cur.limit is None else cur.limit.clone(),
        "params": [p.detach().clone() for p in group.params],
        # the kernel's state buffers; its scratch (SCRATCH) is dead between steps and is not saved
        "kernel_state": {k: [v.clone() for v in vs] for k, vs in group.state.items()
                         if k not in (SCRATCH, STEP)},
        "noise_generators": group.generator_states(),
        "batcher": group.batcher.state_dict(),
        **({"dropout_rng": torch.get_rng_state()} if group.dropout_seed is not None else {}),
        **({"centre": group.centre.state_dict(group)} if group.centre is not None else {}),
    }


def _restore_group(group: _Group, saved: dict[str, Any]) -> _Cursor:
    with torch.no_grad():
        for p, v in zip(group.params, saved["params"]):
            p.copy_(v)
        for k, vs in saved["kernel_state"].items():
            for buf, v in zip(group.state[k], vs):
                buf.copy_(v)
    group.set_generator_states(saved["noise_generators"])
    group.batcher.load_state_dict(saved["batcher"])
    if group.dropout_seed is not None and "dropout_rng" in saved:
        group.dropout_state = saved["dropout_rng"]
    if group.centre is not None:
        group.centre.load_state_dict(group, saved["centre"])
    group.state[STEP] = int(saved["t"])
    limit = saved.get("energy_limit")
    return _Cursor(group.state, int(saved["kept"]), saved["alive"].clone(),
                   None if limit is None else limit.clone())
