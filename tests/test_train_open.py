"""The open loop: tx=, frozen parameters and groups by config, the logged lr from the
optimizer's state, and a Task with its own update step (checkpoints and exact resume)."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcourse.config import base_config
from jaxcourse.data import pipeline
from jaxcourse.errors import ConfigError, UserError
from jaxcourse.train import Task, learning_rate, make_optimizer, make_schedule, train


class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, name="head")(nn.relu(nn.Dense(8, name="body")(x)))[:, 0]


MODEL = TwoLayers()


def _loss(params, model_state, batch, rng, train):
    err = jnp.mean((MODEL.apply({"params": params}, batch["x"]) - batch["y"]) ** 2)
    return err, ({}, model_state)


TASK = Task(init=lambda rng, batch: (MODEL.init(rng, batch["x"])["params"], {}), loss=_loss)


def _data(seed=0, n=128):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)}


def _cfg(steps=10, **optimizer):
    cfg = base_config()
    cfg.train.update(steps=steps, batch_size=16, eval_every=0, log_every=1, steps_per_call=1)
    cfg.optimizer.update(name="adamw", lr=1e-2, weight_decay=0.1, **optimizer)
    return cfg


def _fresh_params(cfg, batch):
    init_rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))[0]  # as the loop splits it
    return TASK.init(init_rng, batch)[0]


def _rows(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_given_tx_is_the_optimizer(tmp_path):
    cfg = _cfg(steps=3)
    cfg.optimizer.name = "not_an_optimizer"  # never read: tx is given
    data = pipeline.batches(_data(), 16, 0)
    tx = optax.sgd(0.0)
    state, _ = train(TASK, cfg, tmp_path, data, tx=tx)
    assert _equal(state.params, _fresh_params(cfg, data[0]))  # lr 0: nothing moved
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(state.params))
    assert "train/lr" not in _rows(tmp_path)[-1]  # sgd(0.0) injects no learning rate


def test_frozen_params_are_unchanged_and_have_no_optimizer_state(tmp_path):
    cfg = _cfg(steps=6, frozen="^body/")
    data = pipeline.batches(_data(), 16, 0)
    state, _ = train(TASK, cfg, tmp_path, data)
    init = _fresh_params(cfg, data[0])
    assert _equal(state.params["body"], init["body"])  # weight decay 0.1 did not touch it
    assert not np.array_equal(state.params["head"]["kernel"], init["head"]["kernel"])
    head = sum(x.size for x in jax.tree.leaves(init["head"]))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * head  # AdamW's mu and nu of the head only


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_group_lr_multiplier_scales_its_update_exactly(name):
    params = {"body": {"kernel": jnp.full((3, 8), 0.5)}, "head": {"kernel": jnp.full((8, 1), 0.5),
                                                                  "bias": jnp.zeros(1)}}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(p.shape), params)
    c = base_config().optimizer
    c.update(name=name, lr=0.1, schedule="warmup_cosine", warmup_steps=2, weight_decay=0.0)
    updates, lrs = {}, {}
    # Same partition both times (XLA may round a leaf's Adam step differently when the tree
    # around it changes); a power-of-two multiplier makes "exactly" exact.
    for mult in (1, 4):
        c.groups = f"^head/:lr={mult}"
        tx = make_optimizer(c, 10)
        state = tx.init(params)
        for _ in range(3):  # past the first step: the warmup's lr is 0 there
            updates[mult], state = jax.jit(tx.update)(grads, state, params)
        lrs[mult] = float(learning_rate(state))
    np.testing.assert_array_equal(updates[4]["body"]["kernel"], updates[1]["body"]["kernel"])
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(updates[4]["head"][leaf], 4.0 * updates[1]["head"][leaf])
    assert float(jnp.abs(updates[1]["head"]["kernel"]).max()) > 0
    assert lrs[4] == lrs[1] == float(np.float32(make_schedule(c, 10)(2)))  # the default group's


def test_group_weight_decay_override():
    params = {"body": {"kernel": jnp.ones((3, 8))}, "head": {"kernel": jnp.ones((8, 1))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    c = base_config().optimizer
    c.update(name="adamw", lr=0.1, weight_decay=0.5, groups="^head/:wd=0")
    tx = make_optimizer(c, 10)
    up, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(up["head"]["kernel"], 0.0)  # no decay in the group
    np.testing.assert_allclose(up["body"]["kernel"], -0.1 * 0.5, rtol=1e-6)


def test_logged_lr_is_the_schedule_value_of_each_step(tmp_path):
    cfg = _cfg(steps=12, schedule="warmup_cosine", warmup_steps=4, groups="^head/:lr=2")
    train(TASK, cfg, tmp_path, pipeline.batches(_data(), 16, 0))
    schedule = make_schedule(cfg.optimizer, cfg.train.steps)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:  # the row of step s holds the lr that update s (0-based s - 1) used;
        # up to cos's last bit, jitted or not (neighbouring steps differ by > 1%).
        assert r["train/lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6, abs=0)
    assert rows[0]["train/lr"] == 0.0 and rows[4]["train/lr"] == pytest.approx(1e-2)


@pytest.mark.parametrize("key, value, match", [
    ("frozen", "[", "optimizer.frozen"),
    ("frozen", "nothing_matches", "optimizer.frozen='nothing_matches' matches no parameter"),
    ("groups", "^head/", "optimizer.groups"),
    ("groups", "^head/:lr=fast", "optimizer.groups"),
    ("groups", "^head/:momentum=2", "optimizer.groups"),
    ("groups", "^nothing/:lr=2", "optimizer.groups.*matches no"),
])
def test_bad_frozen_and_groups_are_config_errors(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        train(TASK, _cfg(steps=2, **{key: value}), tmp_path, pipeline.batches(_data(), 16, 0))


def noisy_sgd_task():
    """A Task with its own update: a gradient step plus rng noise (so resume must replay the
    per-step keys), through the loop's tx."""

    def update(state, batch, rng, tx):
        (loss, _), grads = jax.value_and_grad(_loss, has_aux=True)(
            state.params, state.model_state, batch, rng, True)
        leaves, tree = jax.tree.flatten(grads)
        keys = jax.random.split(rng, len(leaves))
        grads = tree.unflatten([g + 0.01 * jax.random.normal(k, g.shape)
                                for g, k in zip(leaves, keys)])
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        count = state.model_state["updates"] + 1
        return (state.replace(params=params, opt_state=opt_state,
                              model_state={"updates": count}),
                {"loss": loss, "updates": count})

    return Task(init=lambda rng, batch: (TASK.init(rng, batch)[0],
                                         {"updates": jnp.zeros((), jnp.int32)}),
                update=update)


class Killed(Exception):
    pass


def test_task_with_own_update_resumes_exactly(tmp_path):
    cfg = _cfg(steps=20, schedule="warmup_cosine", warmup_steps=3)
    cfg.train.update(steps_per_call=5, log_every=5)
    cfg.optimizer.update(lr=0.05, weight_decay=0.0)
    cfg.checkpoint.every = 10
    data = pipeline.batches(_data(), 16, 0)
    straight, m = train(noisy_sgd_task(), cfg, tmp_path / "straight", data)

    class Dies:
        def __getitem__(self, i):
            if i >= 13:
                raise Killed
            return data[i]

    with pytest.raises(Killed):
        train(noisy_sgd_task(), cfg, tmp_path / "resumed", Dies())
    resumed, m2 = train(noisy_sgd_task(), cfg, tmp_path / "resumed", data)
    assert int(resumed.step) == 20 and int(resumed.model_state["updates"]) == 20
    assert _equal(straight.params, resumed.params)
    assert _equal(straight.opt_state, resumed.opt_state)
    assert (tmp_path / "straight" / "metrics.jsonl").read_text() == \
        (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert m["train/loss"] == m2["train/loss"] and m["train/updates"] == 18.0  # mean of 16..20
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["10", "20"]
    assert m["train/loss"] < _rows(tmp_path / "straight")[0]["train/loss"] * 0.5


def test_bad_custom_tasks_are_user_errors(tmp_path):
    data = pipeline.batches(_data(), 16, 0)
    no_loss = Task(init=TASK.init, update=lambda s, b, r, tx: (s, {"reward": jnp.zeros(())}))
    with pytest.raises(UserError, match="'loss' metric"):
        train(no_loss, _cfg(steps=2), tmp_path / "a", data)
    with pytest.raises(UserError, match="no loss"):
        train(Task(init=TASK.init, update=noisy_sgd_task().update), _cfg(steps=2),
              tmp_path / "b", data, eval_data=[data[0]])
