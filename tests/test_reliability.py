"""Issue 19: what a run does when things go wrong (divergence, a busy workdir, bad values,
signals, a full disk, a damaged checkpoint). Each test reproduces one case of the issue."""
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcourse import ch2, ch4, cli, config, workdir as workdir_lib
from jaxcourse.data import pipeline
from jaxcourse.errors import ConfigError, Interrupted, UserError, WorkdirBusy
from jaxcourse.train import Task, TrainingDiverged, loop, train
from test_train_loop import regression_data, regression_task, small_config, tree_equal

REPO = pathlib.Path(__file__).resolve().parents[1]
CH2 = "--config=configs/ch2_digits.py:smoke"
CH4 = "--config=configs/ch4_gpt.py:smoke"


def ckpt_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def all_saved_states_finite(workdir) -> bool:
    for step in ckpt_steps(workdir):
        tree = ocp.StandardCheckpointer().restore(
            pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state")
        if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
                   if np.issubdtype(np.asarray(x).dtype, np.floating)):
            return False
    return True


def main_exit(main, argv, capsys) -> tuple[int, str]:
    """Runs a chapter's main; (exit code, stderr). 0 when it returns."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


# --- 1. finite-only checkpoints; a diverged run resumes from the last finite one ----------

def poisoning_task():
    """An update whose loss (of the state before it) stays finite while it poisons the state
    at the step whose batch has scale=inf: the guard must look at the state, not the loss."""
    def init(rng, batch):
        return {"w": jnp.zeros(3)}, {}

    def update(state, batch, rng, tx):
        loss = jnp.sum(state.params["w"] ** 2)
        w = (state.params["w"] + 0.1) * batch["scale"]
        return state.replace(params={"w": w}), {"loss": loss}

    return Task(init=init, update=update)


def scales(poison_at=None, n=40):
    out = [{"scale": np.ones(1, np.float32)} for _ in range(n)]
    if poison_at is not None:
        out[poison_at] = {"scale": np.full(1, np.inf, np.float32)}
    return out


def test_poisoned_state_is_never_saved_and_a_rerun_resumes_from_the_last_finite(tmp_path,
                                                                                capsys):
    cfg = small_config(steps=20, steps_per_call=5)
    cfg.checkpoint.every = 5
    with pytest.raises(TrainingDiverged, match="non-finite parameters or optimizer state after "
                                               "step 15.*Last good checkpoint: step 10"):
        train(poisoning_task(), cfg, tmp_path / "run", scales(poison_at=14))  # step 15's batch
    assert ckpt_steps(tmp_path / "run") == [5, 10]  # the old guard saved a poisoned 15.
    assert all_saved_states_finite(tmp_path / "run")
    cfg.optimizer.lr = 1e-3  # a rerun with changed settings resumes from step 10, says so.
    with pytest.warns(UserWarning, match="optimizer.lr: 0.01 -> 0.001"):
        resumed, m = train(poisoning_task(), cfg, tmp_path / "run", scales())
    assert "resuming from the last good checkpoint, step 10" in capsys.readouterr().err
    straight, _ = train(poisoning_task(), cfg, tmp_path / "straight", scales())
    assert int(resumed.step) == 20 and tree_equal(resumed.params, straight.params)
    assert np.isfinite(m["train/loss"])


def test_ch4_diverges_without_a_poisoned_checkpoint_then_trains_survives_sigint_and_reruns(
        tmp_path, capsys, monkeypatch):
    """The issue's commands on the ch4 smoke GPT, one after the other in one workdir."""
    wd = f"--workdir={tmp_path}"
    code, err = main_exit(ch4.main, [CH4, wd, "--config.optimizer.lr=1e6",
                                     "--config.train.steps=200", "--config.checkpoint.every=4"],
                          capsys)
    assert code == 1 and "non-finite" in err and len(err.strip().splitlines()) == 1, err
    assert all_saved_states_finite(tmp_path)  # the old guard kept an all-NaN step 4.
    # SIGINT during the lr=1e-3 rerun: the first call (steps 1-10) ends, is saved, exit 130.
    with monkeypatch.context() as m:
        interrupt_at(m, 0)
        code, err = main_exit(ch4.main, [CH4, wd, "--config.optimizer.lr=1e-3"], capsys)
    lines = err.strip().splitlines()  # progress lines ("step 10/20 loss ..."), then one line:
    assert code == 130 and not any("SIGINT" in line for line in lines[:-1]), err
    assert lines[-1].startswith(f"jaxcourse.ch4: error: SIGINT at step 10: saved a checkpoint "
                                f"in {tmp_path}/checkpoints")
    code, err = main_exit(ch4.main, [CH4, wd, "--config.optimizer.lr=1e-3"], capsys)
    assert code == 0 and "resuming from the last good checkpoint, step 10" in err, err
    summary = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert summary["steps"] == 20 and summary["val_loss"] < 5.0
    assert np.isfinite(summary["train/loss"])
    # 3. A rerun of the finished workdir trains nothing and keeps the real final metrics.
    code, err = main_exit(ch4.main, [CH4, wd, "--config.optimizer.lr=1e-3"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for key in ("train/loss", "val_loss", "steps"):
        assert again[key] == summary[key], key
    # 5. A model change refused against the checkpoint leaves config.json as it was.
    before = (tmp_path / "config.json").read_text()
    code, err = main_exit(ch4.main, [CH4, wd, "--config.model.d_model=48"], capsys)
    assert code == 1 and "another model" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "config.json").read_text() == before


# --- 2. one run per workdir -----------------------------------------------------------------

HOLDER = """import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
pid = sys.argv[2] if len(sys.argv) > 2 else os.getpid()
f.seek(0); f.truncate(); f.write(f"{pid}\\n"); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_busy_workdir_is_refused_with_the_holders_pid_and_a_dead_holders_lock_is_taken(
        tmp_path, capsys):
    tmp_path.joinpath("run").mkdir()
    lock = tmp_path / "run" / workdir_lib.LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = main_exit(ch2.main, [CH2, f"--workdir={tmp_path / 'run'}"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"in use by another run (pid {holder.pid})" in err
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing else
        with pytest.raises(WorkdirBusy, match=f"pid {holder.pid}"):
            train(regression_task(), small_config(steps=5), tmp_path / "run",
                  pipeline.batches(regression_data(), 16, 0))
    finally:
        holder.kill()
        holder.wait()
    assert lock.read_text().strip() == str(holder.pid)  # stale: its process is gone.
    with workdir_lib.locked(tmp_path / "run"):
        with workdir_lib.locked(tmp_path / "run"):  # re-entrant: cli, then train, lock it.
            assert lock.read_text().strip() == str(os.getpid())


# --- 4. / 5. every value checked before anything is written ---------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.batch_size=-1", "train.batch_size must be >= 1"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("optimizer.lr=0", "optimizer.lr must be > 0"),
    ("optimizer.lr=-0.1", "optimizer.lr must be > 0"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.eval_every=-5", "train.eval_every must be >= 0"),
    ("train.grad_accum=0", "train.grad_accum must be >= 1"),
    ("train.steps_per_call=0", "train.steps_per_call must be >= 1"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps must be >= 0"),
    ("checkpoint.every=-1", "checkpoint.every must be >= 0"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
    ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1)"),
    ("optimizer.lr=nan", "optimizer.lr must be a finite number"),
    ("train.grad_accum=3", "not divisible by train.grad_accum=3"),
])
def test_out_of_range_values_exit_2_naming_the_key_and_write_nothing(tmp_path, capsys,
                                                                     override, key):
    code, err = main_exit(ch2.main, [CH2, f"--workdir={tmp_path / 'run'}",
                                     f"--config.{override}"], capsys)
    assert code == 2 and key in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_every_shipped_preset_is_in_range():
    for path in sorted(config.CONFIG_DIR.glob("ch*_*.py")):
        for preset in config.PRESETS:
            config.check_ranges(config.load(f"{path}:{preset}")[0])


def test_config_file_errors_are_one_line_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(preset):\n    return {\n\n    oops(\n")
    code, err = main_exit(ch2.main, [f"--config={bad}", f"--workdir={tmp_path / 'run'}"],
                          capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{bad}:" in err, err
    assert "SyntaxError" in err
    bad.write_text("def get_config(preset):\n    x = 1\n    return undefined_name\n")
    with pytest.raises(ConfigError, match=rf"{bad}:3: NameError: name 'undefined_name'"):
        config.load(str(bad))


# --- SIGINT / SIGTERM: save, one line, exit 128 + signal, exact resume -------------------

def interrupt_at(monkeypatch, step: int, signum=signal.SIGINT):
    """The loop gathers the batches of each compiled call; at `step` it gets a signal, as if
    the user pressed Ctrl-C (or a scheduler preempted the job) during the run."""
    real = loop.stack_batches

    def stack(data, start, count):
        if start == step:
            os.kill(os.getpid(), signum)
        return real(data, start, count)
    monkeypatch.setattr(loop, "stack_batches", stack)


def test_sigterm_saves_and_resume_is_bitwise(tmp_path, monkeypatch):
    """A scheduler's preemption mid-run: the resumed run ends exactly as a straight one."""
    cfg = small_config(steps=20)  # 5 steps per call; a checkpoint only at the end.
    straight, m_straight = run_loop(cfg, tmp_path / "straight")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        interrupt_at(m, 5, signal.SIGTERM)
        with pytest.raises(Interrupted, match="SIGTERM at step 10: saved a checkpoint") as e:
            run_loop(cfg, tmp_path / "resumed")
    assert e.value.exit_code == 143 and ckpt_steps(tmp_path / "resumed") == [10]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    resumed, m_resumed = run_loop(cfg, tmp_path / "resumed")
    assert tree_equal(straight.params, resumed.params)
    assert tree_equal(straight.opt_state, resumed.opt_state)
    assert m_resumed["train/loss"] == m_straight["train/loss"]
    rows = lambda d: (tmp_path / d / "metrics.jsonl").read_text()  # noqa: E731
    assert rows("resumed") == rows("straight")


def test_early_stopping_after_a_resume_stops_where_a_straight_run_does(tmp_path, monkeypatch):
    cfg = small_config(steps=30, patience=1, eval_every=5)
    cfg.optimizer.update(lr=0.0, schedule="constant", warmup_steps=0)  # never improves
    with monkeypatch.context() as m:
        interrupt_at(m, 0)
        with pytest.raises(Interrupted, match="SIGINT at step 5"):
            run_loop(cfg, tmp_path)
    _, resumed = run_loop(cfg, tmp_path)
    # A straight run stops at 10 (test_train_loop.py::test_early_stopping, same config);
    # without the count in the checkpoint the resumed one went on to 15.
    assert resumed["stopped_early"] and resumed["steps"] == 10


def run_loop(cfg, workdir):
    data = regression_data()
    return train(regression_task(), cfg, workdir, pipeline.batches(data, 16, cfg.train.seed),
                 pipeline.eval_batches(data, 100))


def test_second_sigint_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(loop.os, "_exit", exits.append)
    preemption = loop._Preemption()
    preemption._handle(signal.SIGINT, None)
    assert preemption.signum == signal.SIGINT and exits == []
    preemption._handle(signal.SIGINT, None)
    assert exits == [130]


# --- 6. a full disk is one line; earlier checkpoints stay -----------------------------------

def test_disk_full_during_save_is_one_line_and_keeps_earlier_checkpoints(tmp_path,
                                                                         monkeypatch):
    real, calls = ocp.CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if step == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    cfg = small_config(steps=20)
    cfg.checkpoint.every = 5
    with pytest.raises(UserError) as e:
        train(regression_task(), cfg, tmp_path, pipeline.batches(regression_data(), 16, 0))
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "(ENOSPC)" in message
    assert f"{tmp_path}/checkpoints" in message and calls == [5, 10]
    monkeypatch.undo()
    assert ckpt_steps(tmp_path) == [5]
    assert all_saved_states_finite(tmp_path)  # step 5 still restores


def test_disk_full_writing_outputs_is_one_line_naming_the_workdir(tmp_path, capsys,
                                                                  monkeypatch):
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cli, "write_json", full)
    code, err = main_exit(ch2.main, [CH2, f"--workdir={tmp_path}"], capsys)
    assert code == 1 and err.strip() == (f"jaxcourse.ch2: error: cannot write in {tmp_path}: "
                                         "No space left on device (ENOSPC)")


def test_a_lock_kept_by_a_child_of_a_dead_run_says_so(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs, standing for the run that forked the holder
    lock = tmp_path / workdir_lib.LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(gone.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=f"pid {gone.pid}, no longer running: a process "
                                              "it started still holds the lock"):
            with workdir_lib.locked(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
