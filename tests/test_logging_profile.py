"""Observability of the shared loop: TensorBoard event files (read back here record by record),
a W&B copy of the rows, and a profiler trace of a step range; bad values are one-line errors."""
import json
import struct
import sys
import types

import pytest
from tensorboardX.proto import event_pb2

from jaxcourse.errors import ConfigError, UserError
from test_train_loop import run, small_config


def read_events(directory):
    """(tag, step, value) of every scalar in the TFRecord event files under `directory`."""
    scalars = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # length u64, masked crc u32, payload, masked crc u32
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def test_tensorboard_events_hold_the_jsonl_rows(tmp_path):
    cfg = small_config(steps=20)
    cfg.log.tensorboard = True
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = sorted((k, r["step"], v) for r in rows for k, v in r.items() if k != "step")
    got = sorted(read_events(tmp_path / "tensorboard"))
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in want]
    for (_, _, g), (_, _, w) in zip(got, want):  # float32 in the event files
        assert abs(g - w) <= 1e-6 * max(1.0, abs(w))
    assert {"train/loss", "eval/loss", "train/lr"} <= {k for k, _, _ in got}


def test_profile_steps_write_a_trace(tmp_path, capsys):
    cfg = small_config(steps=20, profile_steps="5:10")
    run(cfg, tmp_path)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    assert "profile of steps 5:10" in capsys.readouterr().err


def test_wandb_gets_the_same_rows(tmp_path, monkeypatch):
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = small_config(steps=10)
    cfg.log.wandb = "jaxcourse-test"
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in rows]
    assert any("train/loss" in v for _, v in logged) and any("eval/loss" in v for _, v in logged)


@pytest.mark.parametrize("spec", ["5", "10:5", "a:b", "-1:3"])
def test_bad_profile_steps_are_one_line(tmp_path, spec):
    with pytest.raises(ConfigError, match="train.profile_steps"):
        run(small_config(steps=10, profile_steps=spec), tmp_path)


def test_wandb_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import raises ImportError
    cfg = small_config(steps=10)
    cfg.log.wandb = "p"
    with pytest.raises(UserError, match="needs the wandb package"):
        run(cfg, tmp_path)
