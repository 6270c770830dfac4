"""GAE, PPO losses and GRPO's group advantages against hand-computed values."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.rl import losses
from jaxcourse.rl.advantages import gae, group_advantages, normalize


def test_gae_hand_computed():
    # One env, 3 steps, gamma=0.5, lambda=0.5. Step 1 ends the episode by termination.
    r = jnp.array([[1.0], [2.0], [3.0]])
    v = jnp.array([[0.5], [1.0], [2.0]])
    next_v = jnp.array([[1.0], [9.0], [4.0]])  # 9.0 must be ignored: terminal
    term = jnp.array([[False], [True], [False]])
    done = term
    adv, targets = gae(r, v, next_v, term, done, gamma=0.5, lam=0.5)
    # deltas: 1 + .5*1 - .5 = 1.0 ; 2 + 0 - 1 = 1.0 ; 3 + .5*4 - 2 = 3.0
    # A2 = 3.0 ; A1 = 1.0 (trace cut by done) ; A0 = 1.0 + .25 * 1.0 = 1.25
    np.testing.assert_allclose(adv[:, 0], [1.25, 1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(targets[:, 0], [1.75, 2.0, 5.0], rtol=1e-6)


def test_gae_truncation_bootstraps_but_cuts_trace():
    r = jnp.array([[1.0], [1.0]])
    v = jnp.array([[2.0], [3.0]])
    next_v = jnp.array([[10.0], [4.0]])  # step 0 hit the time limit: V(final obs)=10
    term = jnp.array([[False], [False]])
    done = jnp.array([[True], [False]])
    adv, _ = gae(r, v, next_v, term, done, gamma=0.9, lam=1.0)
    np.testing.assert_allclose(adv[:, 0], [1 + 9.0 - 2.0, 1 + 3.6 - 3.0], rtol=1e-6)


def test_gae_lambda_one_is_discounted_return_minus_value():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(6, 2)).astype(np.float32)
    v = rng.normal(size=(6, 2)).astype(np.float32)
    last = rng.normal(size=(2,)).astype(np.float32)
    next_v = np.concatenate([v[1:], last[None]])
    z = np.zeros((6, 2), bool)
    adv, _ = gae(r, v, next_v, z, z, gamma=0.9, lam=1.0)
    ret = last.copy()
    want = np.zeros_like(r)
    for t in reversed(range(6)):
        ret = r[t] + 0.9 * ret
        want[t] = ret - v[t]
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio,adv,want_loss,want_clipped", [
    (1.5, 1.0, -1.2, 1.0),    # positive advantage: gain capped at 1 + eps
    (0.5, 1.0, -0.5, 1.0),    # ratio fell: unclipped (pessimistic) term wins
    (0.5, -1.0, 0.8, 1.0),    # negative advantage: capped at 1 - eps
    (1.5, -1.0, 1.5, 1.0),    # ratio rose on a bad action: full penalty
    (1.1, 2.0, -2.2, 0.0),    # inside the trust region: plain surrogate
])
def test_clipped_surrogate_at_known_ratios(ratio, adv, want_loss, want_clipped):
    loss, frac = losses.clipped_surrogate(jnp.log(jnp.array([ratio])), jnp.array([adv]), 0.2)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert float(frac) == want_clipped


def test_value_loss_clipping():
    # old 0, new 1, target 2, eps .2: clipped value .2 has the larger error (1.8^2).
    v = losses.value_loss(jnp.array([1.0]), jnp.array([0.0]), jnp.array([2.0]), 0.2, clip=True)
    np.testing.assert_allclose(v, 0.5 * 1.8 ** 2, rtol=1e-6)
    v = losses.value_loss(jnp.array([1.0]), jnp.array([0.0]), jnp.array([2.0]), 0.2, clip=False)
    np.testing.assert_allclose(v, 0.5, rtol=1e-6)


def test_categorical_kl_entropy_and_approx_kl():
    p, q = np.array([0.7, 0.3]), np.array([0.4, 0.6])
    kl = losses.categorical_kl(jnp.log(p)[None], jnp.log(q)[None])[0]
    np.testing.assert_allclose(kl, (p * np.log(p / q)).sum(), rtol=1e-5)
    np.testing.assert_allclose(losses.categorical_entropy(jnp.zeros((1, 4)))[0], np.log(4),
                               rtol=1e-6)
    # Sampled from p, the k3 estimator E[(r-1) - log r] with r = q/p is exactly KL(p||q).
    log_ratio = jnp.log(jnp.array(q / p))
    weights = jnp.array(p)
    k3 = ((jnp.exp(log_ratio) - 1 - log_ratio) * weights).sum()
    np.testing.assert_allclose(k3, kl, rtol=1e-5)
    assert float(losses.approx_kl(jnp.zeros(5))) == 0.0


def test_explained_variance():
    t = jnp.array([1.0, 2.0, 3.0, 4.0])
    assert float(losses.explained_variance(t, t)) == 1.0
    assert abs(float(losses.explained_variance(jnp.full(4, 2.5), t))) < 1e-6


def test_group_advantages_normalize_within_each_group():
    r = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    a = group_advantages(r)
    np.testing.assert_allclose(a[0], [1, -1, -1, 1], atol=1e-5)   # mean .5, std .5
    np.testing.assert_allclose(a[1], 0.0, atol=1e-6)              # no signal in the group
    np.testing.assert_allclose(a[2], np.array([-1, -1, -1, 3]) / np.sqrt(3), rtol=1e-5)
    np.testing.assert_allclose(normalize(jnp.array([1.0, 3.0])), [-1.0, 1.0], rtol=1e-6)
