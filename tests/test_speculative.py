"""Speculative decoding: greedy equals the target's greedy output, sampled tokens follow the
target's distribution, acceptance accounting, the rejection rule alone."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.errors import UserError
from jaxcourse.models import decode
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.serve.sampling import token_probs
from jaxcourse.serve.speculative import _speculative, accept_draft, speculative_generate

V = 6
TARGET = GPT(GPTConfig(vocab_size=V, context=16, n_layer=2, n_head=2, d_model=16))
DRAFT = GPT(GPTConfig(vocab_size=V, context=16, n_layer=1, n_head=2, d_model=8))
PROMPT = jnp.asarray([1, 4, 2], jnp.int32)


def _init(model, seed):
    """Random normal parameters of the model's shapes (no compiled init), std 0.3: sharp
    enough that greedy continuations vary and that draft and target disagree."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    leaves, tree = jax.tree.flatten(nn.meta.unbox(shapes["params"]))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
                                     for x in leaves])


SAMPLED = 4000
N_NEW, GAMMA = 10, 2


@pytest.fixture(scope="module")
def params():
    return _init(TARGET, 0), _init(DRAFT, 1)


@pytest.fixture(scope="module")
def runs(params):
    """One compiled, vmapped call: SAMPLED seeds at temperature 0.7, top-k 4, and a last row
    at temperature 0 (greedy); the sampling settings are traced, so one compile serves all."""
    tp, dp = params
    rows = SAMPLED + 1
    temperature = jnp.full(rows, 0.7).at[-1].set(0.0)
    top_k = jnp.full(rows, 4, jnp.int32).at[-1].set(0)
    run = jax.jit(jax.vmap(lambda k, t, kk: _speculative(
        TARGET, DRAFT, N_NEW, GAMMA, tp, dp, PROMPT, k, (t, kk, jnp.float32(1.0)))))
    tokens, stats = run(jax.random.split(jax.random.key(0), rows), temperature, top_k)
    return np.asarray(tokens), {k: np.asarray(v) for k, v in stats.items()}


def _tv(a, b):
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def test_greedy_equals_target_greedy_and_accounting_adds_up(params, runs):
    tp, _ = params
    tokens, stats = runs
    want = decode.generate(TARGET, tp, PROMPT[None], None, max_new_tokens=N_NEW,
                           temperature=0.0)
    assert tokens[-1].tolist() == want[0].tolist() and len(set(tokens[-1].tolist())) > 1
    # Every row: token 0 from the prefill, then each round its accepted drafts + one token.
    emitted = 1 + stats["accepted"] + stats["rounds"]
    assert np.all((N_NEW <= emitted) & (emitted <= N_NEW + GAMMA))
    assert np.all(stats["drafted"] == GAMMA * stats["rounds"])
    rate = stats["accepted"].sum() / stats["drafted"].sum()
    assert 0.05 < rate < 0.95  # both branches of the rule ran (models that disagree)


def test_accept_draft_first_token_follows_the_target():
    """Leviathan et al. theorem 3.5 on synthetic distributions: 20k rounds; the first token
    out of a round is distributed as p[0] (TV < 0.025; ~0.007 expected from sampling noise),
    while the draft's own q[0] is far from it (TV > 0.2), so the check has power."""
    ks = jax.random.split(jax.random.key(3), 4)
    p = jax.nn.softmax(2.0 * jax.random.normal(ks[0], (3, 5)), axis=-1)
    q = jax.nn.softmax(2.0 * jax.random.normal(ks[1], (2, 5)), axis=-1)

    def one(key):
        k_draft, k_rule = jax.random.split(key)
        drafts = jax.random.categorical(k_draft, jnp.log(q)).astype(jnp.int32)
        tokens, n = accept_draft(p, q, drafts, k_rule)
        return tokens[0], n

    first, n = jax.jit(jax.vmap(one))(jax.random.split(ks[2], 20_000))
    hist = np.bincount(np.asarray(first), minlength=5) / first.shape[0]
    assert _tv(hist, p[0]) < 0.025 and _tv(q[0], p[0]) > 0.2
    # Acceptance of the first draft token: sum_x min(p, q) (Leviathan et al. eq. 1).
    assert abs(float(jnp.mean(n >= 1)) - float(jnp.minimum(p[0], q[0]).sum())) < 0.02


def test_sampled_tokens_follow_the_target_distribution(params, runs):
    """4000 seeds (temperature 0.7, top-k 4, gamma 2): the marginals of generated tokens 1
    and 2 against the exact target marginals over all V^2 continuations. Tolerance
    TV < 0.05 (sampling noise ~0.015); the draft's own marginal of token 1 is further than
    0.1 from the target's, so sampling from the draft would fail."""
    tp, dp = params
    tokens = runs[0][:SAMPLED]
    sampling = (0.7, 4, 1.0)

    def exact(model, prm):  # P(token 1), P(token 2) of plain sampling from `model`
        t1, t2 = np.meshgrid(np.arange(V), np.arange(V), indexing="ij")
        seqs = np.concatenate([np.tile(PROMPT, (V * V, 1)), t1.reshape(-1, 1),
                               t2.reshape(-1, 1)], axis=1)
        logits = model.apply({"params": prm}, jnp.asarray(seqs))
        pr = jax.vmap(jax.vmap(lambda lg: token_probs(lg, *sampling)))(logits)
        p0 = pr[0, 2]                                  # token 0 after the prompt
        p1 = pr[::V, 3]                                # [t0, t1]: token 1 given token 0
        p2 = pr[:, 4].reshape(V, V, V)                 # [t0, t1, t2]
        joint01 = p0[:, None] * p1
        return joint01.sum(0), (joint01[..., None] * p2).sum((0, 1))

    m1, m2 = exact(TARGET, tp)
    for i, m in ((1, m1), (2, m2)):
        hist = np.bincount(tokens[:, i], minlength=V) / tokens.shape[0]
        assert _tv(hist, m) < 0.05, (i, hist, m)
    assert _tv(exact(DRAFT, dp)[0], m1) > 0.1


def test_bad_arguments_are_user_errors(params):
    tp, dp = params
    with pytest.raises(UserError, match="gamma"):
        speculative_generate(TARGET, tp, DRAFT, dp, PROMPT, None, max_new_tokens=4, gamma=0,
                             temperature=0.0)
    with pytest.raises(UserError, match="context"):
        speculative_generate(TARGET, tp, DRAFT, dp, PROMPT, None, max_new_tokens=12, gamma=4,
                             temperature=0.0)
