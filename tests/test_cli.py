"""Config files, overrides, the chapter command line and its machine defaults."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxcourse import ch2, cli, config, machine
from jaxcourse.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_overrides_keep_types_and_name_bad_keys():
    cfg, stem, preset = config.load("configs/ch2_digits.py:smoke")
    assert (stem, preset) == ("ch2_digits", "smoke")
    config.override(cfg, "train.steps", "7")
    config.override(cfg, "optimizer.lr", "0.5")
    config.override(cfg, "model.stages", "(2, 2)")
    config.override(cfg, "reg.flip", "true")
    assert (cfg.train.steps, cfg.optimizer.lr, cfg.model.stages, cfg.reg.flip) == (7, 0.5, (2, 2), True)
    with pytest.raises(ConfigError, match="unknown config key: train.stepz"):
        config.override(cfg, "train.stepz", "1")
    with pytest.raises(ConfigError, match="unknown config key: trian"):
        config.override(cfg, "trian.steps", "1")
    with pytest.raises(ConfigError, match="train.steps expects int, got 'ten'"):
        config.override(cfg, "train.steps", "ten")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        config.load("configs/ch2_digits.py:huge")
    with pytest.raises(ConfigError, match="config file not found"):
        config.load("configs/nope.py")


def test_derive_copies_changes_removes_and_names_bad_keys():
    cfg, _, _ = config.load("configs/ch4_gpt.py:smoke")
    v = config.derive(cfg, {"train.steps": 3, "optimizer.lr": 1, "model.window": 4,
                            "mesh": None})
    assert (v.train.steps, v.optimizer.lr, v.model.window, "mesh" in v) == (3, 1.0, 4, False)
    assert (cfg.train.steps, cfg.model.window, "mesh" in cfg) == (20, 0, True)  # untouched
    w = config.derive(v, {"mesh": {"data": 2}})
    assert w.mesh.data == 2 and "mesh" not in v
    assert config.derive(v, {"mesh": cfg.mesh}).mesh.to_dict() == cfg.mesh.to_dict()
    with pytest.raises(ConfigError, match="unknown config key: train.stepz"):
        config.derive(cfg, {"train.stepz": 1})
    with pytest.raises(ConfigError, match="unknown config key: trian"):
        config.derive(cfg, {"trian.steps": 1})
    with pytest.raises(ConfigError, match="config key train.steps"):
        config.derive(cfg, {"train.steps": "ten"})


@pytest.mark.parametrize("argv, message", [
    (["--config.train.stepz=5"], "unknown config key: train.stepz"),
    (["--config.optimizer.lr=fast"], "optimizer.lr expects float"),
    (["--bogus=1"], "unknown flag --bogus"),
    (["positional"], "unrecognized argument"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        ch2.main(["--config=configs/ch2_digits.py:smoke", f"--workdir={workdir}", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not workdir.exists()


def test_help_lists_experiments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ch2.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "ch2_digits" in out and "ch2_ablation" in out and "smoke" in out


def test_short_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    by_path, _, _ = config.load("configs/ch2_digits.py:smoke")
    monkeypatch.chdir(tmp_path)  # outside the checkout, as after `pip install .`
    for spec in ("ch2_digits:smoke", "ch2_digits.py:smoke", "configs/ch2_digits.py:smoke"):
        cfg, stem, preset = config.load(spec)
        assert (stem, preset) == ("ch2_digits", "smoke") and cfg.to_dict() == by_path.to_dict()
    assert [name for name, _ in config.experiments("ch2")] == ["ch2_ablation", "ch2_digits"]
    own = tmp_path / "ch2_digits.py"  # a file of the user's own wins over the shipped one.
    own.write_text("from jaxcourse.config import base_config\n\n"
                   "def get_config(preset):\n    cfg = base_config()\n"
                   "    cfg.experiment = 'mine'\n    return cfg\n")
    assert config.load("ch2_digits.py")[0].experiment == "mine"
    with pytest.raises(ConfigError, match="config file not found: ch2_nope"):
        config.load("ch2_nope:smoke")


def test_console_command_dispatches_to_chapters(capsys):
    assert cli.chapters()[:2] == ["ch1", "ch2"] and "ch9" in cli.chapters()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ch2", "--help"])
    assert exit_info.value.code == 0 and "ch2_digits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ch99"])
    assert exit_info.value.code == 2
    assert "unknown chapter 'ch99'" in capsys.readouterr().err


def test_cpu_device_count_follows_the_mesh_and_batch():
    gpt, _, _ = config.load("ch4_gpt:cpu")  # mesh.data=-1, batch 12
    assert gpt.mesh.data == -1 and gpt.train.batch_size == 12
    assert [machine.cpu_device_count(gpt, n) for n in (1, 2, 5, 16)] == [1, 2, 4, 12]
    digits, _, _ = config.load("ch2_digits:cpu")  # no mesh: one device
    assert machine.cpu_device_count(digits, 8) == 1
    with gpt.unlocked():
        gpt.mesh.data, gpt.mesh.tensor = 2, -1
    assert machine.cpu_device_count(gpt, 8) == 8  # batch splits over data=2 only
    with gpt.unlocked():
        gpt.mesh.data, gpt.mesh.tensor = 2, 1  # a fixed mesh: its own device count
    assert machine.cpu_device_count(gpt, 8) == 1


def test_ch4_uses_every_core_and_caches_compiles_without_flags(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAXCOURSE_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", "jaxcourse.ch4", "--config=configs/ch4_gpt.py:smoke",
         f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg, _, _ = config.load("ch4_gpt:smoke")
    expected = machine.cpu_device_count(cfg, machine.cores())
    # Batch 8: the most of 1, 2, 4, 8 devices the cores allow (2 on a 2-core machine).
    assert expected == max(d for d in (1, 2, 4, 8) if d <= machine.cores())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["devices"] == expected
    assert done.stdout.count(f"{expected} cpu devices, compilation cache {tmp_path}/cache") == 1
    assert len(list((tmp_path / "cache").iterdir())) >= 3  # train step, eval, sampling


def test_user_error_while_running_is_one_line_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ch2.main(["--config=configs/ch2_digits.py:smoke", f"--workdir={tmp_path}",
                  "--config.data.name=cifar10", f"--config.data.path={tmp_path}/nowhere"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"jaxcourse.ch2: error: data folder not found: {tmp_path}/nowhere"
    assert json.loads((tmp_path / "config.json").read_text())["data"]["name"] == "cifar10"
