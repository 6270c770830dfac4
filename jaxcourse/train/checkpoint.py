"""The one checkpoint path: orbax, a state pytree plus a JSON `meta` record.

`meta` holds the data position, the shapes of every saved array (so a resume can refuse a
checkpoint written by a different model with a clear message instead of an orbax traceback)
and a sha256 of every array's bytes. A restore verifies the checksums and that every value is
finite; a checkpoint that fails (unreadable, corrupt, tampered, non-finite) is moved aside as
`<step>.corrupt-<ns>` (never deleted) with a warning, and the previous one is used. An OSError
while writing (disk full, I/O error) becomes one line naming the folder.
"""
import errno as errno_lib
import hashlib
import os
import pathlib
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcourse.errors import UserError
from jaxcourse.train.state import all_finite


def tree_signature(tree) -> dict[str, str]:
    """{"params/Dense_0/kernel": "float32[64,10]", ...} for every array leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(leaf, "shape"):
            out[jax.tree_util.keystr(path)] = f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
    return out


def tree_checksums(tree) -> dict[str, str] | None:
    """{"params/Dense_0/kernel": sha256 hex, ...} of every array leaf's bytes; None when several
    processes share the arrays (no process sees every shard, so none can hash the whole)."""
    if jax.process_count() > 1:
        return None
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    arrays = jax.device_get([_plain_array(leaf) for _, leaf in leaves])
    return {jax.tree_util.keystr(path): hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
            for (path, _), a in zip(leaves, arrays) if hasattr(a, "shape")}


def _plain_array(leaf):
    if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf)
    return leaf


def io_error(error: BaseException, directory: pathlib.Path) -> UserError | None:
    """One-line UserError for an OSError with an errno (ENOSPC, EIO, EDQUOT, EROFS, ...) found in
    `error` or its causes (orbax wraps them in its async machinery); None if there is none."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            name = errno_lib.errorcode.get(e.errno, str(e.errno))
            return UserError(f"cannot write a checkpoint in {directory}: {os.strerror(e.errno)} "
                             f"({name}); earlier checkpoints there are untouched")
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


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
        meta = {**meta, "step": int(step), "signature": tree_signature(tree),
                "checksums": tree_checksums(tree)}
        try:
            if int(step) in self._mngr.all_steps():  # a damaged one skipped at restore.
                self._mngr.wait_until_finished()
                self._set_aside(int(step))
            self._mngr.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 - re-raised, an OSError inside as one line.
            raise io_error(e, self.directory) or e

    def wait(self) -> None:
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised, an OSError inside as one line.
            raise io_error(e, self.directory) or e

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def _set_aside(self, step: int) -> pathlib.Path:
        """Renames `<step>` to `<step>.corrupt-<ns>`: out of the way, kept for inspection."""
        old = self.directory / str(step)
        new = old.with_name(f"{old.name}.corrupt-{time.time_ns()}")
        if jax.process_index() == 0:
            old.rename(new)
        self._mngr.reload()
        return new

    def _skip(self, step: int, problem: str) -> None:
        new = self._set_aside(step)
        warnings.warn(f"skipping {problem} checkpoint {self.directory}/{step}; moved to {new}")

    def restore_latest(self, abstract_tree):
        """Newest good checkpoint as (tree, meta), or None if there is none.

        Raises UserError if checkpoints exist but none is good (all are moved aside), or if
        they were written for differently shaped arrays (another model or config).
        """
        for tmp in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
            warnings.warn(f"skipping incomplete checkpoint {tmp} (the run stopped mid-save)")
        steps = sorted(self._mngr.all_steps(), reverse=True)
        want = tree_signature(abstract_tree)
        abstract_tree = jax.tree.map(_on_this_machine, abstract_tree)
        for step in steps:
            try:
                meta = self._mngr.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped.
                self._skip(step, f"unreadable ({type(e).__name__})")
                continue
            _check_signature(meta.get("signature", {}), want, self.directory / str(step))
            try:
                tree = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_tree))).state
            except Exception as e:  # noqa: BLE001
                self._skip(step, f"corrupt ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})")
                continue
            problem = _verify(tree, meta)
            if problem:
                self._skip(step, problem)
                continue
            return tree, meta
        if steps:
            raise UserError(f"no good checkpoint in {self.directory} (steps {steps} were moved "
                            "aside, see the warnings); run again to start afresh")
        return None


def _on_this_machine(x):
    """A target leaf without a sharding restores onto this process's first device: orbax
    would otherwise rebuild the saving run's sharding, whose devices (a 2-device data mesh,
    8 GPUs) this process may not have."""
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
        device = jax.local_devices()[0]
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(device))
    return x


def _verify(tree, meta: dict) -> str | None:
    """What is wrong with a restored tree, or None: a checksum that differs from the one
    saved (a flipped bit on disk), or a non-finite value (written before the finite guard)."""
    saved = meta.get("checksums")
    if saved:
        now = tree_checksums(tree) or {}
        bad = [k for k in sorted(saved) if k in now and now[k] != saved[k]]
        if bad:
            return f"corrupt (checksum mismatch in {bad[0]})"
    # Several processes: their saves were checked finite inside the compiled step already.
    if jax.process_count() == 1 and not bool(all_finite(tree)):
        return "non-finite"
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
