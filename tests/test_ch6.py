"""Chapter 6 end to end on smoke presets through the command line."""
import json

import numpy as np
import pytest

from jaxcourse import ch6
from jaxcourse.rl.gym_adapter import GymnasiumVecEnv


def _run(tmp_path, name, *extra):
    ch6.main([f"--config=configs/ch6_{name}.py:smoke", f"--workdir={tmp_path}", *extra])
    return json.loads((tmp_path / "summary.json").read_text())["metrics"]


def test_ppo_smoke_writes_summary_curves_and_checkpoints(tmp_path):
    m = _run(tmp_path, "ppo")
    assert m["num_seeds"] == 2
    assert 8 < m["mean_return"] < 500  # a near-random CartPole policy lasts ~10-30 steps
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    last = rows[-1]
    # Two actions: entropy at most ln 2, and a fresh policy sits near it; each update stays
    # inside the trust region (measured: entropy 0.693, KL 2e-8, clip fraction 0).
    assert 0.6 < last["entropy"] <= np.log(2) + 1e-6
    assert 0.0 <= last["approx_kl"] < 0.02 and last["clip_frac"] < 0.3
    for key in ("return", "value_loss", "explained_variance"):
        assert np.isfinite(last[key])
    assert (tmp_path / "curves.png").exists() and (tmp_path / "returns.png").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]


def test_stress_grid_smoke(tmp_path):
    m = _run(tmp_path, "stress")
    table = json.loads((tmp_path / "stress.json").read_text())
    assert m["agents"] == len(table) == 4  # 2 entropy coefs x 1 clip x 2 KL coefs x 1 seed
    assert {(r["ent_coef"], r["kl_coef"]) for r in table} == {(0.0, 0.0), (0.0, 1.0),
                                                              (0.1, 0.0), (0.1, 1.0)}
    assert (tmp_path / "stress.png").exists()


def test_gymnasium_adapter_semantics():
    venv = GymnasiumVecEnv("CartPole-v1", 2, seed=0)
    ends = 0
    for _ in range(60):  # always pushing right ends CartPole episodes in ~10 steps
        before = venv.obs.copy()
        reward, term, done, final = venv.step(np.array([1, 1]))
        assert np.all(reward == 1.0)
        for i in range(2):
            if done[i]:  # the next obs is a fresh reset, the final one is kept
                ends += 1
                assert abs(final[i][2]) > 0.2 or abs(final[i][0]) > 2.4
                assert np.all(np.abs(venv.obs[i]) <= 0.05)
            else:
                np.testing.assert_array_equal(final[i], venv.obs[i])
                assert not np.array_equal(before[i], venv.obs[i])
    assert ends >= 6 and np.all(venv.last_return > 0)


def test_gymnasium_and_grpo_smoke(tmp_path):
    m = _run(tmp_path / "gym", "gymnasium")
    assert m["env"] == "gymnasium:CartPole-v1" and 8 < m["mean_return"] < 500  # measured 13.3
    m = _run(tmp_path / "grpo", "grpo")
    # The smoke run is too short to raise the reward (0.06 before and after); it must not
    # lower it, and its policy moves (KL > 0) while staying in the clip range.
    assert m["reward_after"] >= m["reward_before"]
    assert 0.0 < m["final_kl"] < 0.05 and m["final_clip_frac"] < 0.5
    assert m["final_response_length"] >= 1.0
    assert (tmp_path / "grpo" / "sft" / "metrics.jsonl").exists()
    # GRPO runs in the shared loop: a metrics row per step and a final checkpoint.
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "train/kl" in rows[-1]
    # The KL comes from a learning signal: some group's completions scored differently (with
    # none, the advantages are 0 and only rounding noise, through Adam, could move it).
    assert min(r["train/zero_signal_groups"] for r in rows) < 1.0
    assert (tmp_path / "grpo" / "checkpoints" / "3").is_dir()


def test_bad_config_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ch6.main(["--config=configs/ch6_ppo.py:smoke", f"--workdir={tmp_path}",
                  "--config.ppo.num_minibatches=5"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_minibatches" in err[0]
