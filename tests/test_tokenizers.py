"""Tokenizers: round trips, hand-computed merges and fertility, save/load, clear errors."""
import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from jaxcourse.data import tokenizers as T
from jaxcourse.errors import UserError

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
          "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n") * 4
# Unicode, digits, underscores, tabs and emoji: bytes the corpus never showed the trainer.
ODD = "naïve café 日本語 x_1\t\t42 😀  end\n"


@pytest.mark.parametrize("name", ["bpe_scratch", "bpe"])
def test_bpe_round_trip_and_compression(name):
    tok = T.make_tokenizer(name, CORPUS, vocab_size=300)
    assert tok.vocab_size <= 300
    for text in (CORPUS, ODD, ""):
        assert tok.decode(tok.encode(text)) == text
    # Merges learned on the corpus must shorten it relative to raw bytes.
    assert len(tok.encode(CORPUS)) < 0.7 * len(CORPUS.encode())


def test_scratch_and_package_bpe_learn_the_same_merge_count():
    # Same algorithm, same pre-tokenization idea: both compress the corpus to the same length.
    a = T.make_tokenizer("bpe_scratch", CORPUS, 280)
    b = T.make_tokenizer("bpe", CORPUS, 280)
    assert abs(len(a.encode(CORPUS)) - len(b.encode(CORPUS))) <= 0.05 * len(b.encode(CORPUS))


def test_scratch_bpe_first_merges_by_hand():
    # Pieces: "ab" x1, " ab" x2. Pair counts: (a,b)=3, (' ',a)=2 -> first merge (a,b),
    # then (' ', ab)=2 is the only pair left.
    tok = T.ScratchBPE.train("ab ab ab", vocab_size=258)
    assert tok.merges == [(ord("a"), ord("b")), (ord(" "), 256)]
    assert tok.token_bytes(257) == b" ab"
    assert tok.encode("ab ab abc") == [256, 257, 257, ord("c")]


def test_fertility_hand_examples():
    text = "ab ab abc"  # 3 words
    char = T.make_tokenizer("char", text)
    assert T.fertility(char, text) == pytest.approx(9 / 3)  # one token per character
    bpe = T.ScratchBPE.train("ab ab ab", vocab_size=257)  # only merge: (a,b)
    # "ab" -> [ab]; " ab" -> [' ', ab]; " abc" -> [' ', ab, c]: 6 tokens over 3 words.
    assert T.fertility(bpe, text) == pytest.approx(6 / 3)


def test_char_tokenizer_vocab_and_round_trip():
    tok = T.CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 8
    assert tok.encode("hold") == [tok.chars.index(c) for c in "hold"]
    assert tok.decode(tok.encode("lower hello")) == "lower hello"


@pytest.mark.parametrize("name", ["char", "bpe_scratch", "bpe"])
def test_save_load(tmp_path, name):
    tok = T.make_tokenizer(name, CORPUS, 290)
    tok.save(tmp_path / "tok.json")
    back = T.load_tokenizer(tmp_path / "tok.json")
    assert back.vocab_size == tok.vocab_size
    assert back.encode(CORPUS) == tok.encode(CORPUS)


def test_bpe_saves_and_loads_a_standard_tokenizer_json(tmp_path):
    tok = T.make_tokenizer("bpe", CORPUS, 290)
    tok.save(tmp_path / "tokenizer.json")
    # The file is the package's own format: its reader gives the same ids.
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert theirs.encode(CORPUS + ODD).ids == tok.encode(CORPUS + ODD)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    # A tokenizer.json this project never wrote (a word-level vocabulary) loads too.
    vocab = {"[UNK]": 0, "speak": 1, ",": 2, "hear": 3}
    word = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.save(str(tmp_path / "word.json"))
    loaded = T.load_tokenizer(tmp_path / "word.json")
    assert loaded.vocab_size == 4 and loaded.encode("hear speak, citizen") == [3, 1, 2, 0]
    # The wrapped form earlier versions saved still loads, to the same tokenizer.
    (tmp_path / "old.json").write_text(json.dumps(
        {"kind": "bpe", "tokenizer": (tmp_path / "tokenizer.json").read_text()}))
    assert T.load_tokenizer(tmp_path / "old.json").encode(CORPUS) == tok.encode(CORPUS)
    (tmp_path / "broken.json").write_text('{"model": {"type": "nope"}}')
    with pytest.raises(UserError, match="cannot read tokenizer file .*broken.json"):
        T.load_tokenizer(tmp_path / "broken.json")


def test_bad_input_errors(tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer 'wordpiece'"):
        T.make_tokenizer("wordpiece", CORPUS)
    for name in T.NAMES:
        with pytest.raises(UserError, match="empty corpus"):
            T.make_tokenizer(name, "", 300)
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary"):
        T.CharTokenizer.from_text("abc").encode("abz")
    with pytest.raises(UserError, match=">= 256"):
        T.make_tokenizer("bpe_scratch", CORPUS, 100)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer file"):
        T.load_tokenizer(tmp_path / "bad.json")


def test_compare_table():
    rows = T.compare(CORPUS, ["char", "bpe_scratch", "bpe"], [280, 300])
    assert [(r["tokenizer"], r["vocab_size"] <= max(280, 300)) for r in rows] == [
        ("char", True), ("bpe_scratch", True), ("bpe_scratch", True), ("bpe", True), ("bpe", True)]
    assert rows[0]["fertility"] == pytest.approx(len(CORPUS) / len(CORPUS.split()))
    assert rows[0]["chars_per_token"] == 1.0
    # More merges, fewer tokens per word.
    assert rows[2]["fertility"] <= rows[1]["fertility"] < rows[0]["fertility"]
