"""Config files, overrides and the chapter command line."""
import json

import pytest

from jaxcourse import ch2, config
from jaxcourse.errors import ConfigError


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
    assert "configs/ch2_digits.py" in out and "configs/ch2_ablation.py" in out and "smoke" in out


def test_user_error_while_running_is_one_line_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ch2.main(["--config=configs/ch2_digits.py:smoke", f"--workdir={tmp_path}",
                  "--config.data.name=cifar10", f"--config.data.path={tmp_path}/nowhere"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"jaxcourse.ch2: error: data folder not found: {tmp_path}/nowhere"
    assert json.loads((tmp_path / "config.json").read_text())["data"]["name"] == "cifar10"
