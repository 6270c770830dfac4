"""One run per workdir: an advisory lock, and config.json written only once a resume fits.

The lock is `fcntl.flock` on `<workdir>/.lock`, which holds the holder's pid. The kernel drops
a flock when its process dies, so a lock file left by a dead run is stale by construction: the
next run takes it and writes its own pid. Locks are re-entrant within a process (the command
line locks the workdir, then `train` locks it again), and only process 0 of a multi-process
run locks (the others share its workdir on purpose).

`write_when_resumable` holds back a write (the command line's config.json) for a workdir that
already has checkpoints until `train` has checked them against the model (`resumable`): a run
refused for a changed model leaves the old config.json in place.
"""
import contextlib
import fcntl
import os
import pathlib
from typing import Callable

from jaxcourse.errors import WorkdirBusy

LOCK_NAME = ".lock"
_held: dict[pathlib.Path, list] = {}          # lock path -> [open file, depth]
_pending: dict[pathlib.Path, Callable[[], None]] = {}


def _holder(path: pathlib.Path) -> str:
    """`pid N` from the lock file, flagged when N is gone: then a child it forked still holds
    the open lock (the kernel frees a flock only with its last open descriptor)."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return "an unknown process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid}, no longer running: a process it started still holds the lock"
    except PermissionError:
        pass  # alive, another user's
    return f"pid {pid}"


@contextlib.contextmanager
def locked(workdir: pathlib.Path):
    """Holds `workdir`'s lock (creating the folder); raises WorkdirBusy naming the holder."""
    workdir = pathlib.Path(workdir).absolute()
    path = workdir / LOCK_NAME
    if path in _held:
        _held[path][1] += 1
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise WorkdirBusy(f"workdir {workdir} is in use by another run ({_holder(path)}); "
                              "wait for it, stop it, or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _held[path] = [f, 1]
    try:
        yield path
    finally:
        _held[path][1] -= 1
        if _held[path][1] == 0:
            f = _held.pop(path)[0]
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def has_checkpoints(workdir: pathlib.Path) -> bool:
    folder = pathlib.Path(workdir) / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


@contextlib.contextmanager
def write_when_resumable(workdir: pathlib.Path, write: Callable[[], None]):
    """Runs `write` now on a workdir without checkpoints; otherwise when `train` calls
    `resumable(workdir)`, or when the block ends without an error. An error before then
    (a refused checkpoint) drops the write."""
    key = pathlib.Path(workdir).absolute()
    if not has_checkpoints(key):
        write()
        yield
        return
    _pending[key] = write
    try:
        yield
        resumable(key)
    finally:
        _pending.pop(key, None)


def resumable(workdir: pathlib.Path) -> None:
    """`train` has restored (or initialized) the state of `workdir`: held-back writes run."""
    write = _pending.pop(pathlib.Path(workdir).absolute(), None)
    if write is not None:
        write()
