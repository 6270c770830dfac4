"""DINO: centering, the multi-view loss (no same-view pairs), schedules, head, multi-crop,
weighted k-NN, collapse monitor, one teacher/student update."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcourse.errors import UserError
from jaxcourse.parallel import make_mesh
from jaxcourse.train import TrainState
from jaxcourse.vision import dino as D
from jax.sharding import PartitionSpec as P


class TinyPixelEncoder(nn.Module):
    """Stand-in for the ViT: a per-pixel layer and global average pooling (any resolution)."""
    d: int = 8

    @nn.compact
    def __call__(self, images, *, train=False):
        return {"pooled": nn.gelu(nn.Dense(self.d)(images)).mean(axis=(1, 2))}


def test_center_update_maths_one_device_and_sharded():
    c = jnp.full((3,), 2.0)
    t = jnp.array([[1.0, 0.0, 4.0], [3.0, 2.0, 0.0]])
    np.testing.assert_allclose(D.update_center(c, t, 0.9), 0.9 * 2.0 + 0.1 * np.array(
        [2.0, 1.0, 2.0]), rtol=1e-6)
    mesh = make_mesh({"data": 8})
    big = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    f = jax.shard_map(lambda x: D.update_center(c, x, 0.9, "data"), mesh=mesh,
                      in_specs=P("data"), out_specs=P(), axis_names={"data"})
    np.testing.assert_allclose(jax.jit(f)(big), D.update_center(c, big, 0.9), rtol=1e-5)


def test_dino_loss_skips_same_view_pairs():
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(2, 4, 5)).astype(np.float32)
    student = rng.normal(size=(5, 4, 5)).astype(np.float32)  # 2 global + 3 local views
    center = np.array([0.1, -0.2, 0.0, 0.3, 0.0], np.float32)
    tt, ts = 0.05, 0.1
    softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(  # noqa: E731
        x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    q = softmax((teacher - center) / tt)
    logp = np.log(softmax(student / ts))
    pairs = [(v, s) for v in range(2) for s in range(5) if s != v]
    want = np.mean([-(q[v] * logp[s]).sum(-1).mean() for v, s in pairs])
    loss_and_grads = jax.jit(jax.value_and_grad(D.dino_loss, argnums=(0, 1)))
    got, (g_student, g_teacher) = loss_and_grads(student, teacher, center, tt, ts)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the student's copy of teacher view 0 only meets teacher view 1: its gradient is
    # that one cross-entropy's, over the 8 pairs
    probs = softmax(student[0] / ts)
    one = (probs - q[1]) / ts / student.shape[1]  # d/ds of the mean CE(q, softmax(s / ts))
    np.testing.assert_allclose(g_student[0], one / len(pairs), rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(g_teacher).sum()) == 0.0  # no gradient into the teacher
    with pytest.raises(UserError, match="must start"):
        D.dino_loss(student[:1], teacher, center, tt)


def test_schedules_endpoints():
    cfg = D.DINOConfig(teacher_temp_warmup=100, total_steps=1000)
    temps = [float(D.teacher_temperature(s, cfg)) for s in (0, 50, 100, 500)]
    np.testing.assert_allclose(temps, [0.04, 0.055, 0.07, 0.07], rtol=1e-6)
    moms = [float(D.teacher_momentum(s, cfg)) for s in (0, 500, 1000, 2000)]
    np.testing.assert_allclose(moms, [0.996, 0.998, 1.0, 1.0], rtol=1e-6)
    teacher = {"w": jnp.ones(3)}
    np.testing.assert_allclose(D.momentum_update(teacher, {"w": jnp.zeros(3)}, 0.9)["w"], 0.9)
    with pytest.raises(UserError, match="n_global >= 2"):
        D.DINOConfig(n_global=1)
    with pytest.raises(UserError, match="local_scale"):
        D.DINOConfig(local_scale=(0.5, 0.2))


def test_head_multicrop_and_collapse_monitor():
    cfg = D.DINOConfig(out_dim=6, hidden_dim=8, bottleneck_dim=4, n_local=3, global_size=8,
                       local_size=4)
    images = np.random.default_rng(2).uniform(size=(2, 12, 12, 3)).astype(np.float32)
    k = 6
    sharp = np.random.default_rng(6).normal(size=(2, 3, k)).astype(np.float32) * 10
    center = np.full((k,), 0.5, np.float32)
    student = (sharp - center) * 0.1 / 0.04  # the student already matches the teacher
    head = D.DINOHead(cfg)
    x = np.random.default_rng(5).normal(size=(7, 5)).astype(np.float32)

    @jax.jit
    def run(key):  # one compile for crops, head and monitor
        flat = D.collapse_monitor(jnp.zeros((4, 3, k)), jnp.zeros((2, 3, k)), jnp.zeros(k),
                                  0.04)
        return (D.multi_crop(key, images, cfg), head.init_with_output(jax.random.key(4), x)[0],
                flat, D.collapse_monitor(student, sharp, center, 0.04))

    a, out, flat_mon, mon = run(jax.random.key(3))
    b = run(jax.random.key(3))[0]
    chex.assert_shape([a["global"], a["local"]], [(2, 2, 8, 8, 3), (3, 2, 4, 4, 3)])
    np.testing.assert_array_equal(a["global"], b["global"])  # seeded
    assert not np.allclose(a["global"][0], a["global"][1])   # two different views
    chex.assert_shape(out, (7, 6))
    # a unit bottleneck times unit-norm prototypes: every logit is a cosine
    assert float(jnp.abs(out).max()) <= 1.0 + 1e-5
    np.testing.assert_allclose(flat_mon["teacher_entropy"], np.log(k), rtol=1e-5)
    np.testing.assert_allclose(flat_mon["kl"], 0.0, atol=1e-6)
    assert float(mon["teacher_entropy"]) < 0.05 * np.log(k)
    np.testing.assert_allclose(mon["kl"], 0.0, atol=1e-5)


def test_head_bn_spreads_nearly_identical_features_apart():
    """Features that differ by 1e-2 between images: the plain head maps them to almost the
    same logits, the batch-standardised head (head_bn) to logits that differ by order one."""
    rng = np.random.default_rng(0)
    x = (1.0 + 1e-2 * rng.normal(size=(16, 8))).astype(np.float32)
    z = D.batch_standardize(jnp.asarray(x))
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    var = x.var(0)  # about 1e-4; eps 1e-5 keeps it a little under one
    np.testing.assert_allclose(z.std(0), np.sqrt(var / (var + 1e-5)), rtol=1e-3)
    spread = {}
    for bn in (False, True):
        cfg = D.DINOConfig(out_dim=6, hidden_dim=8, bottleneck_dim=4, head_bn=bn)
        out, params = D.DINOHead(cfg).init_with_output(jax.random.key(0), x)
        assert ("bn_0_scale" in params["params"]) == bn
        spread[bn] = float(out.std(0).mean())
    assert spread[False] < 0.02 and spread[True] > 0.1, spread


def test_knn_separable_is_perfect_and_random_labels_near_chance():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 16)) * 5
    labels = rng.integers(0, 4, 400)
    feats = means[labels] + rng.normal(size=(400, 16))
    acc = D.knn_accuracy(feats[:300], labels[:300], feats[300:], labels[300:], 4, k=20)
    assert acc == 1.0
    noise = rng.normal(size=(1000, 16))
    random_labels = rng.integers(0, 10, 1000)
    acc = D.knn_accuracy(noise[:800], random_labels[:800], noise[800:], random_labels[800:],
                         10, k=20)
    assert 0.02 < acc < 0.2  # chance is 0.1
    # the vote is weighted: one very close neighbour outvotes two far ones
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]], np.float32)
    pred = D.knn_predict(train, np.array([1, 0, 0]), np.array([[1.0, 0.05]], np.float32), 2,
                         k=3)
    assert int(pred[0]) == 1
    with pytest.raises(UserError, match="k-NN with k=5"):
        D.knn_predict(train, np.array([1, 0, 0]), train, 2, k=5)


def test_dino_task_update_moves_teacher_and_center():
    cfg = D.DINOConfig(out_dim=8, hidden_dim=8, bottleneck_dim=4, n_local=2, global_size=8,
                       local_size=4, teacher_temp_warmup=10, total_steps=10)
    task = D.dino_task(D.DINO(TinyPixelEncoder(), cfg))
    batch = {"image": np.random.default_rng(7).uniform(size=(4, 12, 12, 3)).astype(np.float32)}
    tx = optax.sgd(0.5)

    @jax.jit
    def init_and_update(batch):  # one compile
        params, model_state = task.init(jax.random.key(8), batch)
        state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                           model_state=model_state, ema_params=None, rng=jax.random.key(9))
        return params, model_state, *task.update(state, batch, jax.random.key(10), tx)

    params, model_state, new, metrics = init_and_update(batch)
    chex.assert_tree_all_finite((new.params, new.model_state, metrics))
    m = float(metrics["teacher_momentum"])
    assert m == pytest.approx(0.996)
    jax.tree.map(lambda t, s, t0: np.testing.assert_allclose(t, m * t0 + (1 - m) * s, rtol=1e-5,
                                                             atol=1e-7),
                 new.model_state["teacher"], new.params, model_state["teacher"])
    assert float(jnp.abs(new.model_state["center"]).sum()) > 0  # moved off its zero init
    assert float(metrics["teacher_temp"]) == pytest.approx(0.04)
    assert not np.allclose(new.params["head"]["last_v"], params["head"]["last_v"])
