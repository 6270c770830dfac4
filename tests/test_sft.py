"""SFT data: hand-checked masks, masked loss ignores the prompt, splits, few-shot, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcourse.data import sft
from jaxcourse.data.tokenizers import CharTokenizer
from jaxcourse.errors import UserError
from jaxcourse.lm import lm_loss

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :\n")


def test_encode_mask_by_hand():
    arrays = sft.encode_examples([("up: ab\n", "AB\n")], TOK, context=12)
    seq = TOK.encode("up: ab\nAB\n")  # 10 tokens -> 9 (input, target) positions
    np.testing.assert_array_equal(arrays["inputs"][0, :9], seq[:-1])
    np.testing.assert_array_equal(arrays["targets"][0, :9], seq[1:])
    # Targets 6..8 are "A", "B", "\n" (the answer); the prompt's 7 tokens predict nothing.
    np.testing.assert_array_equal(arrays["mask"][0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    assert TOK.decode(arrays["targets"][0][arrays["mask"][0] > 0]) == "AB\n"


def test_masked_loss_ignores_prompt_tokens():
    arrays = sft.encode_examples([("upper: cat\n", "CAT\n"), ("reverse: ox\n", "xo\n")], TOK, 20)
    logits = jax.random.normal(jax.random.key(0), (2, 20, TOK.vocab_size))
    loss, _ = lm_loss(logits, arrays["targets"], arrays["mask"])
    mask = arrays["mask"] > 0
    # Scrambling every prompt / padding position's logits leaves the loss unchanged...
    noise = 5 * jax.random.normal(jax.random.key(1), logits.shape)
    scrambled = jnp.where(mask[..., None], logits, noise)
    assert float(lm_loss(scrambled, arrays["targets"], arrays["mask"])[0]) == pytest.approx(
        float(loss), rel=1e-6)
    # ...and it is the mean negative log-likelihood of the 7 answer tokens alone.
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, arrays["targets"][..., None], -1)[..., 0]
    assert float(loss) == pytest.approx(float(nll[mask].sum() / 7), rel=1e-5)
    assert mask.sum() == len("CAT\n") + len("xo\n")
    # Changing one answer position's logits does change it.
    bumped = logits.at[0, 10, 0].add(10.0)
    assert float(lm_loss(bumped, arrays["targets"], arrays["mask"])[0]) != pytest.approx(float(loss))


def test_answer_accuracy_is_exact_match_of_answer_tokens():
    arrays = sft.encode_examples([("up: ab\n", "AB\n"), ("up: ba\n", "BA\n")], TOK, 12)
    perfect = np.eye(TOK.vocab_size)[arrays["targets"]] * 10.0
    np.testing.assert_array_equal(sft.answer_accuracy(perfect, arrays), [1.0, 1.0])
    wrong_prompt = perfect.copy()
    wrong_prompt[0, 0] = 0.0  # a prompt position does not count
    wrong_answer = perfect.copy()
    wrong_answer[1, 7, :] = 0.0
    wrong_answer[1, 7, 0] = 20.0  # answer token "A" of row 1 replaced by id 0
    np.testing.assert_array_equal(sft.answer_accuracy(wrong_prompt, arrays), [1.0, 1.0])
    np.testing.assert_array_equal(sft.answer_accuracy(wrong_answer, arrays), [1.0, 0.0])


def test_examples_tasks_and_split():
    words = sft.words_from_text("The crown, the crown! Of kings and a queen; ox xy")
    assert words == ["crown", "the", "kings", "and", "queen"]  # 3..7 lowercase letters, once
    train, held = sft.split_words(sft.FALLBACK_WORDS, 0.3)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(sft.FALLBACK_WORDS)
    assert sft.split_words(list(reversed(sft.FALLBACK_WORDS)), 0.3)[1] == list(reversed(held))
    ex = sft.make_examples(["crown"], ["reverse", "upper", "sort"], 30, seed=0)
    assert set(ex) == {("reverse: crown\n", "nworc\n"), ("upper: crown\n", "CROWN\n"),
                       ("sort: crown\n", "cnorw\n")}


def test_few_shot_fits_context_and_keeps_task():
    shots = [("upper: ab\n", "AB\n"), ("reverse: ab\n", "ba\n"), ("upper: cd\n", "CD\n"),
             ("upper: ef\n", "EF\n")]
    [(prompt, answer)] = sft.few_shot([("upper: xy\n", "XY\n")], shots, context=40, tok=TOK,
                                      max_shots=3)
    # Each upper example is 13 chars; three would need 39 + 14 - 1 > 40 tokens, so two fit.
    assert prompt == "upper: ab\nAB\nupper: cd\nCD\nupper: xy\n" and answer == "XY\n"


def test_bad_input():
    with pytest.raises(UserError, match="longer than the context"):
        sft.encode_examples([("upper: " + "a" * 30 + "\n", "A\n")], TOK, context=16)
    with pytest.raises(UserError, match="does not fit the context"):
        sft.encode_examples([("upper: abcd\n", "ABCDEFGH\n")], TOK, context=16)
    with pytest.raises(UserError, match="unknown SFT task"):
        sft.make_examples(["crown"], ["translate"], 1, seed=0)
    tok = CharTokenizer.from_text("upper: crown\nCROWN\nz")  # no "Z": "zz" is unusable
    assert sft.usable_words(["crown", "zz"], ["upper"], tok, context=20) == ["crown"]
    # "upper: cc\nCC\n" is 13 tokens (12 positions), "upper: crown\nCROWN\n" 19.
    assert sft.usable_words(["crown", "cc"], ["upper"], tok, context=12) == ["cc"]
    with pytest.raises(UserError, match="no word gives examples"):
        sft.usable_words(["crown"], ["upper"], tok, context=8)
