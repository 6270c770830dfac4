"""Chapter 1 end to end, and the makemore character models it trains."""

import inspect
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse import ch1
from jaxcourse.autodiff import debugging
from jaxcourse.errors import UserError
from jaxcourse.models import charlm
from jaxcourse.models.charlm import CharLM, CharLMConfig

CFG = "configs/ch1_backprop.py:smoke"


# ---------------- character models ----------------

def test_context_windows_hand_computed():
    tokens = jnp.array([[5, 6, 7, 8]])
    got = charlm.context_windows(tokens, context=3, pad_id=9)
    want = [[[9, 9, 5], [9, 5, 6], [5, 6, 7], [6, 7, 8]]]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["bigram", "mlp"])
def test_charlm_shapes_and_locality(kind):
    model = CharLM(CharLMConfig(vocab_size=11, kind=kind, context=3, embed_dim=4, hidden_dim=8))
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 11)
    apply = jax.jit(model.apply)
    with jax.numpy_rank_promotion("raise"):  # no silent broadcasting inside the model
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
        if kind == "bigram":  # zero init predicts uniformly whatever the input: randomize
            params = {"table": jax.random.normal(jax.random.key(2), (11, 11))}
        logits = apply({"params": params}, tokens)
    assert logits.shape == (2, 7, 11)
    # Changing token 4 may only move the predictions that can see it: positions
    # 4 .. 4 + context - 1 (the bigram's context is 1).
    reach = 1 if kind == "bigram" else 3
    moved = apply({"params": params}, tokens.at[:, 4].set((tokens[:, 4] + 1) % 11))
    changed = np.any(np.abs(np.asarray(moved - logits)) > 0, axis=(0, 2))
    np.testing.assert_array_equal(changed, [t in range(4, 4 + reach) for t in range(7)])


def test_charlm_config_errors():
    with pytest.raises(UserError, match="kind"):
        CharLMConfig(vocab_size=5, kind="rnn")
    with pytest.raises(UserError, match="context"):
        CharLMConfig(vocab_size=5, context=0)
    model = CharLM(CharLMConfig(vocab_size=5, kind="bigram"))
    with pytest.raises(UserError, match="batch, length"):
        model.init(jax.random.key(0), jnp.zeros((4,), jnp.int32))


def test_count_bigram_nll_hand_computed_and_matches_the_table_model():
    ids = np.array([0, 1, 0, 1, 1, 0])  # bigrams: 01 10 01 11 10
    # counts: from 0 -> {1: 2}; from 1 -> {0: 2, 1: 1}. No smoothing:
    want = -(2 * math.log(1.0) + 2 * math.log(2 / 3) + math.log(1 / 3)) / 5
    assert charlm.count_bigram_nll(ids, ids, 2, smoothing=0.0) == pytest.approx(want)
    # A bigram table holding the log count-probabilities has exactly that loss.
    probs = np.array([[1e-12, 1.0], [2 / 3, 1 / 3]])
    model = CharLM(CharLMConfig(vocab_size=2, kind="bigram"))
    logits = model.apply({"params": {"table": jnp.log(jnp.asarray(probs))}}, jnp.asarray([ids[:-1]]))
    assert float(charlm.next_token_loss(logits, jnp.asarray([ids[1:]]))) == pytest.approx(want, rel=1e-5)


def test_sample_is_deterministic_and_in_vocab():
    model = CharLM(CharLMConfig(vocab_size=6, kind="mlp", context=2, embed_dim=3, hidden_dim=5))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    a = charlm.sample(model, params, [1], 12, jax.random.key(3))
    assert a == charlm.sample(model, params, [1], 12, jax.random.key(3))
    assert len(a) == 12 and all(0 <= i < 6 for i in a)
    # A table that always predicts "next = current + 1" samples that sequence.
    bigram = CharLM(CharLMConfig(vocab_size=4, kind="bigram"))
    table = 50.0 * jnp.roll(jnp.eye(4), 1, axis=1)
    assert charlm.sample(bigram, {"table": table}, [2], 5, jax.random.key(0)) == [3, 0, 1, 2, 3]


# ---------------- the chapter end to end ----------------

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ch1")
    ch1.main([f"--config={CFG}", f"--workdir={workdir}"])
    return workdir, json.loads((workdir / "summary.json").read_text())["metrics"]


def test_smoke_run_meets_the_done_when(smoke_run):
    workdir, m = smoke_run
    assert m["engine_max_abs_diff"] <= 1e-6
    assert m["mlp_handwritten_vs_jax_max_abs_diff"] <= 1e-6
    for png in ("optimizers.png", "charlm_loss.png", "mlp_backprop_loss.png"):
        assert (workdir / png).stat().st_size > 1000
    for lab in ch1.LABS:
        assert f"seconds_{lab}" in m


def test_smoke_run_numbers_make_sense(smoke_run):
    workdir, m = smoke_run
    assert m["gradcheck_rel_err_jax_grad"] < 1e-7 and m["gradcheck_rel_err_handwritten"] < 1e-7
    assert m["gradcheck_rel_err_planted_bug"] > 0.1
    assert m["modes_wide_jacrev_flops"] < m["modes_wide_jacfwd_flops"]
    assert m["modes_tall_jacfwd_flops"] < m["modes_tall_jacrev_flops"]
    assert m["lse_naive_at_1000_is_inf"] == 1.0
    assert m["lse_stable_at_1000"] == pytest.approx(1000 + math.log(1 + math.exp(-1) + math.exp(-2)))
    assert m["mlp_final_loss"] < m["mlp_first_loss"]
    for name in ("sgd", "adam"):  # 20 steps: well above the 10% of chance already
        assert m[f"opt_{name}_eval_accuracy"] > 0.2
        rows = (workdir / f"opt_{name}" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[-1])["step"] == 20
    # Any training beats predicting uniformly; counts (closed form) beat 20 steps of training.
    assert m["charlm_count_bigram_eval_nll"] < m["charlm_bigram_eval_loss"] < m["charlm_uniform_nll"]
    assert m["charlm_uniform_nll"] == pytest.approx(math.log(m["charlm_vocab_size"]))
    # The planted NaN: printed, then caught and located by debug_nans and checkify.
    assert m["debug_buggy_loss_is_nan"] == 1.0 and m["debug_buggy_grad_has_nan"] == 1.0
    assert "inf" in m["debug_debug_print"] and "nan" in m["debug_debug_nans_message"]
    for key in ("debug_debug_nans_location", "debug_checkify_location", "debug_checkify_grad_location"):
        assert m[key] == bug_line()
    assert m["debug_fixed_grad_finite"] == 1.0 and m["debug_fixed_vs_buggy_small_logits"] < 1e-6
    assert (workdir / "charlm_samples.txt").read_text().count("===") == 4


def test_one_lab_by_name(tmp_path):
    summary = ch1.main([f"--config={CFG}", f"--workdir={tmp_path}", "--config.labs=lse"])
    assert {k.split("_")[0] for k in summary["metrics"]} == {"lse", "seconds"}


@pytest.mark.parametrize("override, message", [
    ("--config.labs=engine,nope", "unknown lab(s) nope"),
    ("--config.optimizers.lrs=(0.1,)", "optimizers.lrs has 1"),
    ("--config.optimizers.names=('sgd','sgd')", "repeats a name"),
])
def test_bad_config_is_one_line_and_exit_1(tmp_path, capsys, override, message):
    labs = [] if "labs" in override else ["--config.labs=optimizers"]
    with pytest.raises(SystemExit) as e:
        ch1.main([f"--config={CFG}", f"--workdir={tmp_path}", override, *labs])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def bug_line() -> str:
    """'debugging.py:N' of the planted division, found in the source (not hard-coded)."""
    lines = inspect.getsource(debugging).splitlines()
    n = next(i + 1 for i, line in enumerate(lines) if "probs_BxC = jnp.exp(logits_BxC) /" in line)
    return f"debugging.py:{n}"
