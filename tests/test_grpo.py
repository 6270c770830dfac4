"""GRPO pieces: the addition reward, completion masks, the loss at known ratios."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.rl import grpo
from jaxcourse.rl.lm_tasks import EOS, AdditionTask, decode, encode


def test_addition_reward_and_sft_data():
    task = AdditionTask()
    idx = jnp.array([37, 37, 37, 12, 12])  # 3+7=10, 3+7, 3+7, 1+2=3, 1+2
    comp = jnp.array([encode("10."), encode("1.."), encode("100"), encode("3.."),
                      encode("3.7")])
    np.testing.assert_array_equal(task.reward(idx, comp), [1, 0, 0, 1, 1])
    batch = task.sft_batch(np.random.default_rng(0), 256)
    seqs = [decode(np.concatenate([i[:1], t])) for i, t in zip(batch["inputs"],
                                                                  batch["targets"])]
    right = [eval(s[:3]) == int(s[4:].split(".")[0]) for s in seqs]
    assert 0.2 < np.mean(right) < 0.5  # noisy teacher: 30% + chance hits
    # The loss counts exactly the answer digits and the ".", nothing of the prompt.
    n_counted = batch["mask"].sum(1)
    n_answer = [len(s[4:].split(".")[0]) + 1 for s in seqs]
    np.testing.assert_array_equal(n_counted, n_answer)


def test_completion_mask_stops_after_first_eos():
    comp = jnp.array([[1, EOS, EOS], [1, 2, EOS], [EOS, 3, EOS], [1, 2, 3]])
    np.testing.assert_array_equal(grpo.completion_mask(comp, EOS),
                                  [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])


def test_grpo_loss_at_known_ratios():
    mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    adv = jnp.array([1.0, -1.0])
    same = jnp.zeros((2, 2))
    loss, aux = grpo.grpo_loss(same, same, same, adv, mask, 0.2, 0.1)
    # ratio 1, no KL: -(mean over sequences of A) = -(1 - 1)/2 = 0
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    assert float(aux["kl"]) == 0.0 and float(aux["clip_frac"]) == 0.0
    # Sequence 0 has ratio 1.5 on both tokens (clipped at 1.2), sequence 1 ratio 0.5 on its
    # one counted token (A<0: min(-0.5, -0.8) = -0.8); its masked token must not count.
    logp = jnp.log(jnp.array([[1.5, 1.5], [0.5, 7.0]]))
    loss, aux = grpo.grpo_loss(logp, same, logp, adv, mask, 0.2, 0.0)
    np.testing.assert_allclose(loss, -(1.2 + -0.8) / 2, rtol=1e-6)
    np.testing.assert_allclose(aux["clip_frac"], 1.0)
    # KL(pi||ref) by k3 with ref/pi = 2 on every counted token: 2 - log 2 - 1.
    loss, aux = grpo.grpo_loss(same, same, jnp.full((2, 2), jnp.log(2.0)), jnp.zeros(2),
                               mask, 0.2, 0.5)
    k3 = 2 - np.log(2) - 1
    np.testing.assert_allclose(aux["kl"], k3, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.5 * k3, rtol=1e-6)


def test_token_logprobs_match_full_softmax():
    cfg = GPTConfig(vocab_size=13, context=8, n_layer=1, n_head=2, d_model=16, pos="learned")
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (3, 7), 0, 13)
    params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
    got = jax.jit(grpo.token_logprobs, static_argnums=(0, 3))(cfg, params, tokens, 4)
    logp = jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, tokens), -1)
    want = jnp.stack([logp[:, t - 1][jnp.arange(3), tokens[:, t]] for t in range(4, 7)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_grpo_in_the_shared_loop_resumes_exactly(tmp_path):
    """policy_task: GRPO iterations as the loop's update step, killed after a checkpoint and
    resumed, equal a straight run bit for bit (params, Adam state, metrics rows)."""
    import flax.linen as nn
    import pytest

    from jaxcourse.config import base_config
    from jaxcourse.rl.lm_tasks import VOCAB
    from jaxcourse.train import train

    mc = GPTConfig(vocab_size=len(VOCAB), context=8, n_layer=1, n_head=2, d_model=16,
                   pos="learned")
    task = AdditionTask()
    params = nn.meta.unbox(jax.jit(GPT(mc).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
                           ["params"])
    gc = grpo.GRPOConfig(prompts_per_step=2, group_size=2, inner_steps=2)
    # The exact reward is 0 for every completion of a random policy: no advantage, nothing to
    # learn. The first token's parity differs within most groups.
    parity = lambda idx_B, completion_BxC: (completion_BxC[:, 0] % 2).astype(jnp.float32)  # noqa: E731
    make = lambda tx: grpo.make_grpo_step(mc, gc, task, parity, tx)  # noqa: E731
    cfg = base_config()
    cfg.train.update(steps=4, steps_per_call=1, log_every=1, eval_every=0)
    cfg.checkpoint.every = 2

    class Killed(Exception):
        pass

    class Dies:
        def __getitem__(self, i):
            if i >= 3:
                raise Killed
            return {}

    straight, _ = train(grpo.policy_task(make, params, params, seed=5), cfg, tmp_path / "a",
                        [{}] * 4)
    with pytest.raises(Killed):
        train(grpo.policy_task(make, params, params, seed=5), cfg, tmp_path / "b", Dies())
    resumed, _ = train(grpo.policy_task(make, params, params, seed=5), cfg, tmp_path / "b",
                       [{}] * 4)
    for a, b in ((straight.params, resumed.params), (straight.opt_state, resumed.opt_state)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    rows = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert rows == (tmp_path / "b" / "metrics.jsonl").read_text() and "train/kl" in rows
    assert min(json.loads(r)["train/zero_signal_groups"] for r in rows.splitlines()) < 1.0
    moved = max(float(jnp.abs(x - y).max()) for x, y in
                zip(jax.tree.leaves(straight.params), jax.tree.leaves(params)))
    assert moved > 1e-4  # four iterations of 2 Adam steps at lr 1e-3 moved the policy
