"""The serving engine: paged cache, continuous batching, per-request sampling, no recompiles.

One warmed-up engine of the tiny GPT for the module (tests/serve_tiny.py): 3 slots, blocks of
4 tokens, a pool of 16 blocks (two whole-context sequences at a time).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from serve_tiny import CFG, TOK, tiny_engine, tiny_params

from jaxcourse.errors import UserError
from jaxcourse.models import decode
from jaxcourse.models.transformer import GPT, GPTConfig
from jaxcourse.serve import paged_cache
from jaxcourse.serve.engine import Engine, Request, SamplingParams
from jaxcourse.serve.sampling import row_keys, sample_rows


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def engine(params):
    return tiny_engine(params)


def _prompt(n, seed):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).tolist()


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0)


def test_allocator_reserves_takes_and_frees():
    a = paged_cache.BlockAllocator(6)  # blocks 1..5; 0 is scratch
    assert a.reserve(3) and a.free == 2 and a.in_use == 0
    assert not a.reserve(3)  # admission would wait
    got = [a.take(), a.take()]
    assert got == [1, 2] and a.in_use == 2 and a.free == 2
    a.release(got, unreserve=1)  # finished early: one reserved block never taken
    assert a.free == 5 and a.in_use == 0


def test_gather_and_write_roundtrip():
    layout = paged_cache.PagedLayout(n_layer=2, kv_heads=1, head_dim=2, context=8, block_size=2,
                                     slots=2)
    pool = paged_cache.init_pool(layout, jnp.float32)
    table = jnp.asarray([[3, 1, 0, 0], [2, 4, 5, 0]], jnp.int32)
    kv_prompt = {n: jnp.arange(2 * 8 * 2, dtype=jnp.float32).reshape(2, 8, 1, 2) + 1 for n in "kv"}
    pool = paged_cache.write_prompt(pool, table[1:], jnp.asarray([5]),  # 5 positions of 8
                                    jax.tree.map(lambda a: a[:, None], kv_prompt))
    tok = {n: jnp.full((2, 2, 1, 2), -1.0) for n in "kv"}
    pool = paged_cache.write_token(pool, table, jnp.asarray([2, 5]), tok)
    view = jnp.swapaxes(paged_cache.gather(pool, table)["k"], 2, 3)  # [L, S, 8, K, D]
    np.testing.assert_array_equal(view[:, 1, :5], kv_prompt["k"][:, :5])
    np.testing.assert_array_equal(view[:, 1, 5], -1.0)
    np.testing.assert_array_equal(view[:, 0, 2], -1.0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.3, 0, 0.6),
                                                     (0.9, 3, 0.8)])
def test_sample_rows_is_sample_logits(temperature, top_k, top_p):
    logits = jax.random.normal(jax.random.key(1), (4, 40)) * 3
    keys = row_keys(jnp.arange(4, dtype=jnp.int32) + 7, jnp.full((4,), 2, jnp.int32))
    got = sample_rows(logits, keys, jnp.full(4, temperature), jnp.full(4, top_k, jnp.int32),
                      jnp.full(4, top_p))
    want = [int(decode.sample_logits(logits[i:i + 1], keys[i], temperature=temperature,
                                     top_k=top_k, top_p=top_p)[0]) for i in range(4)]
    assert got.tolist() == want


def test_concurrent_greedy_equals_generate_without_recompiling(engine, params):
    compiled = engine.compilations()
    prompts = {n: [_prompt(n, i), _prompt(n, i + 10)] for i, n in enumerate((3, 20))}
    # 5 requests for 3 slots, of different lengths and settings, side by side (a sampled
    # one among them must not disturb the greedy ones); they join as others leave.
    reqs = [Request(p, _greedy(8)) for n in (3, 20) for p in prompts[n]]
    reqs.insert(1, Request(_prompt(9, 9), SamplingParams(max_tokens=12, temperature=0.8,
                                                         top_k=5, top_p=0.9, seed=3)))
    results = engine.complete(reqs)
    del results[1]
    want = np.concatenate([decode.generate(GPT(CFG), params, jnp.asarray(prompts[n]), None,
                                           max_new_tokens=8, temperature=0.0)
                           for n in (3, 20)])
    for res, want_row in zip(results, want):
        assert res["tokens"] == want_row.tolist()
        assert res["finish_reason"] == "length"
        assert res["text"] == TOK.decode(res["tokens"])
    assert engine.compilations() == compiled  # no new request compiled anything
    assert engine.allocator.in_use == 0 and not any(engine.running)


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    sampled = Request(_prompt(5, 1), SamplingParams(max_tokens=10, temperature=1.0, seed=42))
    alone = engine.complete([sampled])[0]
    crowd = engine.complete([Request(_prompt(7, 2), _greedy(6)), sampled,
                             Request(_prompt(12, 3), SamplingParams(max_tokens=9, seed=1))])
    assert crowd[1]["tokens"] == alone["tokens"]
    other = engine.complete([Request(sampled.prompt, SamplingParams(max_tokens=10, seed=43))])
    assert other[0]["tokens"] != alone["tokens"]


def test_stop_strings_end_the_text_and_free_blocks(engine):
    prompt = _prompt(4, 5)
    full = engine.complete([Request(prompt, _greedy(12))])[0]["text"]
    stop = full[5:7]
    start = full.find(stop)
    res = engine.complete([Request(prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                          stop=("zzzz", stop)))])[0]
    assert res["finish_reason"] == "stop" and res["text"] == full[:start]
    assert engine.allocator.in_use == 0


def test_admission_waits_for_blocks_and_max_tokens_is_cut(engine):
    # Each request may grow to the whole context (8 blocks); the pool holds 16, so only two
    # run at once although three slots are free.
    reqs = [Request(_prompt(20, i), _greedy(100)) for i in range(3)]
    for r in reqs:
        engine.submit(r)
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, sum(r is not None for r in engine.running))
        assert engine.allocator.in_use <= 16
    assert most == 2


def test_cancel_frees_the_slot(engine):
    events = []
    rid = engine.submit(Request(_prompt(6, 0), _greedy(20), events.append))
    engine.step()
    engine.step()
    engine.cancel(rid)
    engine.step()
    # Step 1: prefill (token 0) and a decode chunk (tokens 1-4); step 2: tokens 5-8; then
    # cancelled.
    assert [len(e.tokens) for e in events] == [1, 4, 4, 0]
    assert events[-1].finish_reason == "cancelled"
    assert engine.allocator.in_use == 0 and not engine.has_work()


def test_bad_requests_are_user_errors(engine):
    with pytest.raises(UserError, match="no room"):
        engine.submit(Request(_prompt(32, 0)))
    with pytest.raises(UserError, match="at least one token"):
        engine.submit(Request([]))
    with pytest.raises(UserError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(UserError, match="serve .* needs attention mixers"):
        Engine(GPTConfig(vocab_size=8, context=8, n_layer=1, d_model=8, n_head=2,
                         mixer="mamba"), {})


def test_rows_at_their_own_positions_match_each_row_alone(params):
    """A cache index of shape [B] (the engine's decode rows, each at its own fill level)
    gives every row the logits it gets alone with a scalar index; the stack takes its
    per-layer caches as a list and returns a list (the decode chunk's in-place carry)."""
    model, lengths = GPT(CFG), (3, 7)
    alone, caches = [], []
    for n in lengths:
        cache, _ = decode.prefill(model, params, jnp.asarray([_prompt(n, 40 + n)]), 16)
        logits, _ = model.apply({"params": params}, jnp.asarray([[5]]), cache=cache)
        alone.append(logits[0, 0])
        caches.append(cache["layers"])
    stacked = jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *caches)  # [L, B, ...]
    index = jnp.asarray(lengths, jnp.int32)
    tokens = jnp.asarray([[5], [5]])
    logits, new = model.apply({"params": params}, tokens,
                              cache={"layers": stacked, "index": index})
    np.testing.assert_allclose(logits[:, 0], jnp.stack(alone), atol=1e-5, rtol=1e-5)
    assert new["index"].tolist() == [4, 8]
    per_layer = ([jax.tree.map(lambda a, i=i: a[i], stacked[0]) for i in range(CFG.n_layer)],)
    logits_l, new_l = model.apply({"params": params}, tokens,
                                  cache={"layers": per_layer, "index": index})
    assert isinstance(new_l["layers"][0], list) and len(new_l["layers"][0]) == CFG.n_layer
    np.testing.assert_allclose(logits_l, logits, atol=1e-6, rtol=1e-6)
    # each row's new key went to its own position: row 0 at 3, row 1 at 7
    k_BxKxSxD = new_l["layers"][0][0]["k"]
    assert float(jnp.abs(k_BxKxSxD[0, :, 3]).sum()) > 0 and float(
        jnp.abs(k_BxKxSxD[0, :, 4:]).sum()) == 0
    assert float(jnp.abs(k_BxKxSxD[1, :, 7]).sum()) > 0 and float(
        jnp.abs(k_BxKxSxD[1, :, 8:]).sum()) == 0
