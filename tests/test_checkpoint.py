"""Checkpointer: retention (the newest `keep` stay), integrity (checksums, finite values:
a bad checkpoint is moved aside and the previous one used), one-line I/O errors."""
import errno
import json

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcourse.errors import UserError
from jaxcourse.train import Checkpointer


def test_keeps_the_newest_checkpoints(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, {"w": jnp.full((3,), float(step))}, {"data_position": step})
    ckpt.wait()
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [3, 4]
    tree, meta = ckpt.restore_latest({"w": jnp.zeros((3,))})
    assert meta["step"] == 4 and float(tree["w"][0]) == 4.0
    # A fresh Checkpointer (a resumed run) sees the same two and keeps pruning.
    again = Checkpointer(tmp_path / "ckpt", keep=2)
    again.save(5, {"w": jnp.full((3,), 5.0)}, {"data_position": 5})
    again.wait()
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [4, 5]


def _saved(tmp_path, trees):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=5)
    for step, tree in enumerate(trees, start=1):
        ckpt.save(step, tree, {"data_position": step})
    ckpt.wait()
    return ckpt


def _array_files(step_dir):
    """The files holding array bytes (not orbax's JSON metadata or the manifest)."""
    return [f for f in sorted((step_dir / "state").rglob("*")) if f.is_file()
            and "metadata" not in f.name and "manifest" not in f.name]


def test_a_flipped_byte_is_detected_moved_aside_and_the_previous_one_used(tmp_path):
    trees = [{"w": jnp.arange(4096.0) * step} for step in (1, 2)]
    _saved(tmp_path, trees)
    newest = tmp_path / "ckpt" / "2"
    files = _array_files(newest)
    assert files, sorted(newest.rglob("*"))
    for f in files:  # one byte in the middle of every array file
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    fresh = Checkpointer(tmp_path / "ckpt", keep=5)
    with pytest.warns(UserWarning, match=r"skipping corrupt .*ckpt/2; moved to .*2\.corrupt-"):
        tree, meta = fresh.restore_latest({"w": jnp.zeros(4096)})
    assert meta["step"] == 1 and float(tree["w"][3]) == 3.0
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names[0] == "1" and names[1].startswith("2.corrupt-")  # kept, never deleted


def test_checksum_mismatch_is_caught_even_when_the_arrays_read_fine(tmp_path):
    """A flip that decodes to other valid numbers: only the checksum can tell."""
    _saved(tmp_path, [{"w": jnp.ones(8)}, {"w": jnp.full(8, 2.0)}])
    meta_file = next(p for p in (tmp_path / "ckpt" / "2" / "meta").rglob("*") if p.is_file())
    meta = json.loads(meta_file.read_text())
    digest = meta["checksums"]["['w']"]
    meta["checksums"]["['w']"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"checksum mismatch in \['w'\]"):
        tree, meta = Checkpointer(tmp_path / "ckpt").restore_latest({"w": jnp.zeros(8)})
    assert meta["step"] == 1 and float(tree["w"][0]) == 1.0


def test_nonfinite_checkpoint_from_an_older_run_is_skipped(tmp_path):
    _saved(tmp_path, [{"w": jnp.ones(3)}, {"w": jnp.array([1.0, jnp.nan, 0.0])}])
    with pytest.warns(UserWarning, match="skipping non-finite checkpoint"):
        tree, meta = Checkpointer(tmp_path / "ckpt").restore_latest({"w": jnp.zeros(3)})
    assert meta["step"] == 1


def test_all_bad_is_an_error_and_an_async_io_error_is_one_line(tmp_path, monkeypatch):
    _saved(tmp_path, [{"w": jnp.full(3, np.nan)}])
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no good checkpoint"):
        Checkpointer(tmp_path / "ckpt").restore_latest({"w": jnp.zeros(3)})
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.restore_latest({"w": jnp.zeros(3)}) is None  # moved aside: starts afresh.

    def failed_write(self):  # orbax's background thread re-raises wrapped errors.
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as e:
            raise RuntimeError("async save failed") from e

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", failed_write)
    with pytest.raises(UserError, match=r"cannot write a checkpoint in .*ckpt: .*\(EIO\)"):
        ckpt.wait()
