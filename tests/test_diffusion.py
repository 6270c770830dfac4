"""Diffusion math against closed forms: forward marginals, samplers, guidance, EMA, Fréchet.

The samplers are checked with the exact denoiser of Gaussian data x_0 ~ N(mu, s^2) (per
pixel), for which E[eps | x_t] is known in closed form, so any error is the sampler's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.diffusion import samplers
from jaxcourse.diffusion.guidance import guided_model_fn
from jaxcourse.diffusion.metrics import frechet_distance, frechet_from_stats
from jaxcourse.diffusion.schedules import (make_schedule, q_sample, split_output,
                                           training_target)
from jaxcourse.errors import UserError

MU = np.array([0.5, -1.0, 2.0, 0.0], np.float32).reshape(1, 2, 2, 1)
STD = np.array([0.3, 1.0, 0.1, 2.0], np.float32).reshape(1, 2, 2, 1)


def gaussian_model(sched, prediction="eps"):
    """The optimal network for x_0 ~ N(MU, STD^2): E[eps | x_t], or the matching v."""
    def model_fn(x, t_B):
        a = sched.alpha_bars[t_B][:, None, None, None]
        eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * STD ** 2 + 1 - a)
        if prediction == "eps":
            return eps
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
    return model_fn


def flow_map(sched, x_T):
    """Exact probability-flow ODE endpoint for Gaussian data: the Gaussian quantile is kept,
    x_t = sqrt(a) MU + sqrt(a STD^2 + 1 - a) z, so x_0 = MU + STD z."""
    a = sched.alpha_bars[-1]
    z = (x_T - jnp.sqrt(a) * MU) / jnp.sqrt(a * STD ** 2 + 1 - a)
    return MU + STD * z


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_forward_chain_marginals_match_closed_form(kind):
    """Running x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) n step by step gives the
    closed-form marginal N(sqrt(abar_t) x_0, 1 - abar_t) that q_sample draws from."""
    sched = make_schedule(kind, 1000)
    np.testing.assert_allclose(sched.alpha_bars, np.cumprod(1 - np.float64(sched.betas)),
                               rtol=1e-4)
    x0 = jnp.full((20_000,), 0.8)
    checkpoints = jnp.array([0, 99, 499, 999])

    def step(x, inputs):
        beta, key = inputs
        x = jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * jax.random.normal(key, x.shape)
        return x, x

    keys = jax.random.split(jax.random.PRNGKey(0), 1000)
    _, xs = jax.lax.scan(step, x0, (sched.betas, keys))
    chain = xs[checkpoints]
    direct = jax.vmap(lambda t, k: q_sample(sched, x0, jnp.full(x0.shape, t),
                                            jax.random.normal(k, x0.shape)))(
        checkpoints, jax.random.split(jax.random.PRNGKey(1), 4))
    abar = sched.alpha_bars[checkpoints]
    for got in (chain, direct):
        np.testing.assert_allclose(got.mean(1), jnp.sqrt(abar) * 0.8, atol=0.02)
        np.testing.assert_allclose(got.std(1), jnp.sqrt(1 - abar), rtol=0.02, atol=2e-3)


def test_cosine_schedule_values():
    """Nichol & Dhariwal eq. 17 by hand at t = T/2: f(t)/f(0) with s = 0.008."""
    sched = make_schedule("cosine", 1000)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(sched.alpha_bars[499], f(500) / f(0), rtol=1e-5)
    lin = make_schedule("linear", 1000)
    np.testing.assert_allclose(np.asarray(lin.betas)[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    with pytest.raises(UserError, match="diffusion.schedule"):
        make_schedule("quadratic", 10)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_targets_round_trip(prediction):
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(
        np.float32)
    abar = np.array([0.9, 0.5, 0.01], np.float32)
    x_t = np.sqrt(abar)[:, None] * x0 + np.sqrt(1 - abar)[:, None] * noise
    out = training_target(x0, noise, abar, prediction)
    x0_hat, eps_hat = split_output(x_t, out, abar, prediction)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, noise, atol=2e-4)


def test_timesteps_are_trailing_and_validated():
    np.testing.assert_array_equal(samplers.timesteps(1000, 4), [999, 666, 333, 0])
    np.testing.assert_array_equal(samplers.timesteps(5, 5), [4, 3, 2, 1, 0])
    with pytest.raises(UserError, match="sampling steps"):
        samplers.timesteps(10, 11)


COSINE = make_schedule("cosine", 1000)
EXACT = gaussian_model(COSINE)


# Compiled once per input shape; the plan (step count) is an input, not a constant.
@jax.jit
def ddpm(plan, key, x_T):
    return samplers.ddpm_sample(EXACT, plan, key, x_T)


@jax.jit
def ddim(plan, key, x_T, eta):
    return samplers.ddim_sample(EXACT, plan, key, x_T, eta)


@jax.jit
def ode(plan, x_T):
    return samplers.ode_sample(EXACT, plan, None, x_T)


X_T = jax.random.normal(jax.random.PRNGKey(2), (4000, 2, 2, 1))


@pytest.mark.parametrize("steps", [1000, 20])
def test_ddim_eta1_reproduces_ddpm(steps):
    """DDIM's eta=1 variance is DDPM's posterior variance: same noise, same samples."""
    p, key = samplers.plan(COSINE, steps), jax.random.PRNGKey(3)
    np.testing.assert_allclose(ddim(p, key, X_T, 1.0), ddpm(p, key, X_T), atol=2e-4)


def test_ddpm_and_ddim_eta1_match_data_statistics():
    """With the exact denoiser, both stochastic samplers produce N(MU, STD^2) samples."""
    p, key = samplers.plan(COSINE, 1000), jax.random.PRNGKey(5)
    for x in (ddpm(p, key, X_T), ddim(p, jax.random.PRNGKey(6), X_T, 1.0)):
        np.testing.assert_allclose(x.mean(0), MU[0], atol=0.07)
        np.testing.assert_allclose(x.std(0), STD[0], rtol=0.06)


def test_deterministic_samplers_follow_the_probability_flow():
    """DDIM(eta=0) is Euler on the PF-ODE; Heun at 25 steps beats Euler at 50 (same cost)."""
    exact = flow_map(COSINE, X_T)
    err = lambda x: float(jnp.abs(x - exact).max())  # noqa: E731
    key = jax.random.PRNGKey(0)  # unused when eta=0.
    assert err(ddim(samplers.plan(COSINE, 1000), key, X_T, 0.0)) < 0.02
    heun = err(ode(samplers.plan(COSINE, 25), X_T))
    euler = err(ddim(samplers.plan(COSINE, 50), key, X_T, 0.0))
    assert heun < 0.5 * euler, (heun, euler)


def test_v_prediction_samples_like_eps_prediction():
    """The same denoiser written as a v-predictor gives the same DDIM trajectory."""
    p, key = samplers.plan(COSINE, 20), jax.random.PRNGKey(0)
    x_T = X_T[:64]
    v = jax.jit(lambda: samplers.ddim_sample(gaussian_model(COSINE, "v"), p, key, x_T, 0.0,
                                             "v"))()
    np.testing.assert_allclose(v, ddim(p, key, x_T, 0.0), atol=1e-4)


def test_guidance_scale_zero_and_one_are_the_plain_models():
    """w=0 -> unconditional, w=1 -> conditional, through the batched (2B) path too."""
    def apply_fn(x, t, y):  # any label-dependent function will do.
        return x * (1.0 + y[:, None, None, None]) + t[:, None, None, None]

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))
    t, y, null = jnp.array([5, 6, 7]), jnp.array([0, 1, 2]), 10
    cond, uncond = apply_fn(x, t, y), apply_fn(x, t, jnp.full(3, null))
    for w, want in ((0.0, uncond), (1.0, cond), (3.0, uncond + 3.0 * (cond - uncond))):
        fast = guided_model_fn(apply_fn, y, w, null)(x, t)
        batched = guided_model_fn(apply_fn, y, jnp.float32(w), null)(x, t)
        np.testing.assert_allclose(fast, want, rtol=1e-6)
        np.testing.assert_allclose(batched, want, rtol=1e-6)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # Diagonal covariances: d^2 = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2.
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_from_stats(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    # Commuting covariances (same eigenvectors): d^2 = sum (sqrt(l1) - sqrt(l2))^2.
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    c1, c2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_from_stats(m1, c1, m1, c2) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-7)
    feats = rng.normal(size=(200, 5))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(feats, feats + 1.0) == pytest.approx(5.0, rel=1e-9)
    with pytest.raises(UserError, match="same D"):
        frechet_distance(feats, feats[:, :3])


def test_ema_update_of_the_shared_loop():
    """ema_{s+1} = d * ema_s + (1 - d) * params_{s+1}, starting from the initial params:
    after two steps ema = d^2 p0 + d (1 - d) p1 + (1 - d) p2 (what ch8 samples with)."""
    from jaxcourse.config import base_config
    from jaxcourse.train import Task, make_optimizer, make_step
    from jaxcourse.train.loop import init_state

    cfg = base_config()
    cfg.train.ema_decay, cfg.optimizer.name, cfg.optimizer.lr = 0.9, "sgd", 0.1
    target = jnp.array([1.0, -2.0, 3.0])
    task = Task(init=lambda rng, batch: ({"w": jnp.zeros(3)}, {}),
                loss=lambda p, s, b, r, train: (jnp.sum((p["w"] - target) ** 2), ({}, s)))
    tx = make_optimizer(cfg.optimizer, 10)
    state = init_state(task, tx, cfg, {})(jax.random.PRNGKey(0))
    step = jax.jit(make_step(task, tx, cfg))
    params = [state.params["w"]]
    for _ in range(2):
        state, _ = step(state, {})
        params.append(state.params["w"])
    d = 0.9
    want = d * d * params[0] + d * (1 - d) * params[1] + (1 - d) * params[2]
    np.testing.assert_allclose(state.ema_params["w"], want, rtol=1e-6)
    # SGD on (w - target)^2 with lr 0.1: w_{s+1} = w_s - 0.2 (w_s - target), by hand.
    np.testing.assert_allclose(params[2], target * (1 - 0.8 ** 2), rtol=1e-6)


def test_min_snr_weights_are_one_weighting_in_x0_space():
    """For both targets the weighted loss equals min(SNR, gamma) * |x0 error|^2."""
    from jaxcourse.diffusion.task import loss_weights

    abar = jnp.array([0.999, 0.8, 0.3, 0.01])
    snr = abar / (1 - abar)
    rng = np.random.default_rng(0)
    x0, noise, x0_hat = (jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(3))
    x_t = jnp.sqrt(abar)[:, None] * x0 + jnp.sqrt(1 - abar)[:, None] * noise
    want = jnp.minimum(snr, 5.0) * jnp.sum((x0_hat - x0) ** 2, axis=1)
    for prediction in ("eps", "v"):
        # The network output that corresponds to the estimate x0_hat at this x_t.
        eps_hat = (x_t - jnp.sqrt(abar)[:, None] * x0_hat) / jnp.sqrt(1 - abar)[:, None]
        out = training_target(x0_hat, eps_hat, abar, prediction)
        target = training_target(x0, noise, abar, prediction)
        got = loss_weights(abar, prediction, 5.0) * jnp.sum((out - target) ** 2, axis=1)
        np.testing.assert_allclose(got, want, rtol=2e-3)
    np.testing.assert_array_equal(loss_weights(abar, "eps", 0.0), 1.0)
