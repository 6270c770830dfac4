"""Checkpointer: retention (the newest `keep` stay), integrity (checksums, finite values:
a bad checkpoint is moved aside and the previous one used), one-line I/O errors."""
import errno
import os
import subprocess
import sys

import jax
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


def _largest_data_file(step_dir):
    """The file holding the array's bytes (orbax's OCDBT store: chunks under d/)."""
    return max((f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"),
               key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_a_flipped_bit_is_detected_moved_aside_and_the_previous_one_used(tmp_path, where):
    """Measured: one flipped bit in the chunk file decodes to other numbers without any
    orbax error (case 7 of issue 19); only the checksum in the meta tells."""
    rng = np.random.default_rng(0)
    trees = [{"w": jnp.asarray(rng.normal(size=4096).astype(np.float32))} for _ in (1, 2)]
    _saved(tmp_path, trees)
    f = _largest_data_file(tmp_path / "ckpt" / "2")
    raw = bytearray(f.read_bytes())
    raw[int(len(raw) * where)] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"skipping corrupt \(checksum mismatch in \['w'\]\) "
                                         r"checkpoint .*ckpt/2; moved to .*2\.corrupt-"):
        tree, meta = Checkpointer(tmp_path / "ckpt", keep=5).restore_latest({"w": jnp.zeros(4096)})
    assert meta["step"] == 1 and np.array_equal(tree["w"], trees[0]["w"])
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names[0] == "1" and names[1].startswith("2.corrupt-")  # kept, never deleted


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


def test_a_checkpoint_sharded_over_8_devices_restores_in_a_1_device_process(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    w = jax.device_put(jnp.arange(16.0), jax.NamedSharding(mesh, jax.P("data")))
    _saved(tmp_path, [{"w": w}])
    code = ("import jax, jax.numpy as jnp, sys; from jaxcourse.train import Checkpointer; "
            "t, _ = Checkpointer(sys.argv[1], keep=5).restore_latest("
            "{'w': jax.ShapeDtypeStruct((16,), jnp.float32)}); "
            "print(len(jax.devices()), float(t['w'].sum()))")
    env = {**os.environ, "XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "120.0"]  # not taken for corrupt, nothing moved aside
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if "corrupt" in p.name] == []
