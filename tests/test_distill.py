"""Distillation loss maths: KL at T = 1 is soft cross-entropy minus the teacher's entropy;
the T^2-scaled gradient; alpha mixes in the hard labels; the task trains the student only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.lm import distill
from jaxcourse.lm.task import lm_loss
from jaxcourse.models.transformer import GPTConfig

RNG = np.random.default_rng(0)
S = jnp.asarray(RNG.standard_normal((2, 3, 7), np.float32) * 2)
T = jnp.asarray(RNG.standard_normal((2, 3, 7), np.float32) * 2)
Y = jnp.asarray(RNG.integers(0, 7, (2, 3)), jnp.int32)


def test_kl_at_t1_is_soft_ce_minus_teacher_entropy():
    p_t = jax.nn.softmax(T, -1)
    entropy = -jnp.mean(jnp.sum(p_t * jnp.log(p_t), -1))
    np.testing.assert_allclose(distill.kl_divergence(S, T),
                               distill.soft_cross_entropy(S, T) - entropy, rtol=1e-5)
    assert float(distill.kl_divergence(T, T)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_is_t_times_softmax_difference():
    # d/dz_s of T^2 KL(p_t^T || p_s^T) = T (softmax(z_s/T) - softmax(z_t/T)) / positions.
    temp = 3.0
    grad = jax.jit(jax.grad(lambda s: distill.distill_loss(s, T, Y, temperature=temp)[0]))(S)
    want = temp * (jax.nn.softmax(S / temp, -1) - jax.nn.softmax(T / temp, -1)) / 6
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
    no_teacher_grad = jax.grad(lambda t: distill.distill_loss(S, t, Y)[0])(T)
    assert float(jnp.abs(no_teacher_grad).max()) == 0.0


def test_alpha_mixes_hard_labels():
    loss, m = distill.distill_loss(S, T, Y, temperature=2.0, alpha=0.25)
    want = 0.25 * 4.0 * distill.kl_divergence(S, T, 2.0) + 0.75 * lm_loss(S, Y)[0]
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["hard_loss"], lm_loss(S, Y)[0], rtol=1e-6)
    with pytest.raises(UserError, match="temperature"):
        distill.distill_loss(S, T, Y, temperature=0.0)


def test_distill_task_vocab_mismatch_and_eval_loss():
    small = GPTConfig(vocab_size=7, context=8, n_layer=1, n_head=2, d_model=16)
    with pytest.raises(UserError, match="vocab"):
        distill.distill_task(small, GPTConfig(vocab_size=9, context=8, n_layer=1, n_head=2,
                                              d_model=16), None)
    tokens = RNG.integers(0, 7, (2, 9)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    task = distill.distill_task(small, small, None)
    params, _ = jax.jit(task.init)(jax.random.key(0), batch)
    teacher = jax.tree.map(lambda x: x * 1.5, params)
    task = distill.distill_task(small, small, teacher, temperature=1.0)
    rng = jax.random.key(1)

    @jax.jit
    def losses(p):
        return task.loss(p, {}, batch, rng, True)[0], task.loss(p, {}, batch, rng, False)
    train_loss, (eval_loss, (metrics, _)) = losses(params)
    assert float(metrics["loss"]) == pytest.approx(float(eval_loss))
    assert float(train_loss) != pytest.approx(float(eval_loss))
