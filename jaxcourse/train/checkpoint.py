"""The one checkpoint path: orbax, a state pytree plus a JSON `meta` record.

`meta` holds the data position and the shapes of every saved array, so a resume can
refuse a checkpoint written by a different model with a clear message instead of an
orbax traceback. Incomplete or corrupt checkpoints are skipped with a warning.
"""
import pathlib
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcourse.errors import UserError


def tree_signature(tree) -> dict[str, str]:
    """{"params/Dense_0/kernel": "float32[64,10]", ...} for every array leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(leaf, "shape"):
            out[jax.tree_util.keystr(path)] = f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
    return out


class Checkpointer:
    """Saves and restores `(pytree, meta)` pairs under `directory/<step>/`."""

    def __init__(self, directory: pathlib.Path, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        # The newest `keep` checkpoints stay (orbax 0.12 deprecates max_to_keep for this).
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max(keep, 1)), create=True)
        # Items ("state", "meta") and their handlers come from the save / restore args.
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, tree, meta: dict) -> None:
        meta = {**meta, "step": int(step), "signature": tree_signature(tree)}
        if int(step) in self._mngr.all_steps():  # a damaged one skipped at restore: keep it aside.
            self._mngr.wait_until_finished()
            old = self.directory / str(int(step))
            old.rename(old.with_name(f"{old.name}.corrupt-{time.time_ns()}"))
            self._mngr.reload()
        self._mngr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore_latest(self, abstract_tree):
        """Newest restorable checkpoint as (tree, meta), or None if there is none.

        Raises UserError if checkpoints exist but none can be read, or if they were
        written for differently shaped arrays (another model or config).
        """
        for tmp in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
            warnings.warn(f"skipping incomplete checkpoint {tmp} (the run stopped mid-save)")
        steps = sorted(self._mngr.all_steps(), reverse=True)
        want = tree_signature(abstract_tree)
        for step in steps:
            try:
                meta = self._mngr.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped.
                warnings.warn(f"skipping unreadable checkpoint {self.directory}/{step}: "
                              f"{type(e).__name__}")
                continue
            _check_signature(meta.get("signature", {}), want, self.directory / str(step))
            try:
                tree = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_tree))).state
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"skipping corrupt checkpoint {self.directory}/{step}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            return tree, meta
        if steps:
            raise UserError(f"no readable checkpoint in {self.directory} (tried steps {steps}); "
                            "move the directory away to start afresh")
        return None


def _check_signature(saved: dict, want: dict, where) -> None:
    if saved == want:
        return
    for key in sorted(set(saved) | set(want)):
        if saved.get(key) != want.get(key):
            raise UserError(
                f"checkpoint {where} was written for another model: {key} is "
                f"{saved.get(key, 'absent')} there but {want.get(key, 'absent')} in this config; "
                "use another --workdir")
