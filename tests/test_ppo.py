"""PPO end to end on tiny configs: vmapped seeds, chunked resume, the KL objective."""
import json

import jax
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.rl.ppo import Coefs, PPOConfig, make_train
from jaxcourse.rl.runner import chunk_sizes, init_agents, train_agents

TINY = PPOConfig(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 4, update_epochs=2,
                 num_minibatches=2, hidden=16)


@pytest.fixture(scope="module")
def tiny_fns():
    return make_train(TINY)


def test_resume_between_chunks_equals_straight_run(tiny_fns, tmp_path):
    start = init_agents(tiny_fns, [0, 1], Coefs.make())
    straight, metrics, _ = train_agents(tiny_fns, start, 4, chunk=2)
    # A run stopped after its first chunk (checkpoint at update 2), resumed by a fresh call.
    train_agents(tiny_fns, start, 2, chunk=2, workdir=tmp_path)
    resumed, _, _ = train_agents(tiny_fns, init_agents(tiny_fns, [0, 1], Coefs.make()), 4,
                                 chunk=2, workdir=tmp_path)
    assert int(resumed.update[0]) == 4
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                        (straight.params, straight.opt_state, straight.env),
                        (resumed.params, resumed.opt_state, resumed.env))
    assert all(jax.tree.leaves(same))
    np.testing.assert_array_equal(jax.random.key_data(straight.rng),
                                  jax.random.key_data(resumed.rng))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["return"] for r in rows], metrics["return"].mean(0),
                               rtol=1e-6)
    # Seeds differ: vmapped agents are independent.
    assert not np.array_equal(straight.params["actor"]["Dense_0"]["kernel"][0],
                              straight.params["actor"]["Dense_0"]["kernel"][1])


def test_chunk_sizes():
    assert chunk_sizes(10, 4) == [4, 4, 2]
    assert chunk_sizes(8, 0) == [8]
    assert chunk_sizes(3, 5) == [3]


def test_config_errors_name_the_problem():
    with pytest.raises(UserError, match="num_minibatches"):
        PPOConfig(num_envs=3, num_steps=5, num_minibatches=4)
    with pytest.raises(UserError, match="objective"):
        PPOConfig(objective="trpo")
    with pytest.raises(UserError, match="unknown or non-discrete"):
        make_train(PPOConfig(env_name="Pendulum-v1"))
