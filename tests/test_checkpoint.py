"""Checkpointer retention: the newest `keep` checkpoints stay, older ones are deleted."""
import jax.numpy as jnp

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
