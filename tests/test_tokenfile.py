"""Token files: `data.prepare` writes them, `data.tokenfile` memory-maps them back, chapter 4
pretrains from them exactly as from the text; every bad input is one UserError line."""
import json

import numpy as np
import pytest

from jaxcourse import ch4
from jaxcourse.data import pipeline, prepare, tokenfile
from jaxcourse.data import tokenizers as toklib
from jaxcourse.errors import UserError
from jaxcourse.lm import corpus as corpuslib
from jaxcourse.lm.configs import pretrain_config

TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(60))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_prepare_writes_memmapped_splits(tmp_path, text_file):
    meta = prepare.prepare(text_file, tmp_path / "tok", "char", val_fraction=0.1)
    tok, splits, got = tokenfile.open_tokens(tmp_path / "tok", "char")
    assert got == meta and meta["dtype"] == "uint16" and meta["vocab_size"] == len(set(TEXT))
    assert all(isinstance(s, np.memmap) and s.dtype == np.uint16 for s in splits.values())
    n = len(TEXT)  # one token per character: nanoGPT's split at int(n * 0.9)
    assert (len(splits["train"]), len(splits["val"])) == (int(n * 0.9), n - int(n * 0.9))
    assert tok.decode(np.concatenate([splits["train"], splits["val"]])) == TEXT
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "meta.json", "tokenizer.json", "train.bin", "val.bin"]  # no temporary files left
    # The corpus the chapters use: memmaps, windows read from them as int32.
    c = corpuslib.token_corpus(tmp_path / "tok", "char", context=8)
    assert isinstance(c.train, np.memmap)
    b = pipeline.lm_batches(c.train, 4, 8, seed=0)[0]
    assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (4, 8)
    # An existing tokenizer file, and the lesson's BPE, make token files too.
    prepare.prepare(text_file, tmp_path / "again", f"file:{tmp_path / 'tok' / 'tokenizer.json'}")
    np.testing.assert_array_equal(tokenfile.open_tokens(tmp_path / "again", "char")[1]["val"],
                                  splits["val"])
    prepare.prepare(text_file, tmp_path / "scratch", "bpe_scratch:260")
    tok, splits, _ = tokenfile.open_tokens(tmp_path / "scratch", "bpe_scratch", 260)
    assert tok.vocab_size == 260 and tok.decode(np.concatenate(list(splits.values()))) == TEXT


def test_dtype_follows_the_vocabulary(tmp_path):
    assert tokenfile.dtype_for(65_536) == np.uint16 and tokenfile.dtype_for(65_537) == np.uint32
    # A uint32 folder written by hand (as a 100k-token vocabulary would need) reads back.
    ids = np.array([0, 70_000, 99_999, 5], np.uint32)
    ids.tofile(tmp_path / "train.bin")
    meta = {"format": tokenfile.FORMAT, "dtype": "uint32", "vocab_size": 100_000,
            "tokenizer": "bpe", "tokens": {"train": 4}}
    np.testing.assert_array_equal(tokenfile.open_split(tmp_path, "train", meta), ids)


def test_folder_source_and_streamed_bpe_match_whole_text(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    cut = TEXT.index("\n", 1500) + 1  # files end with whole lines, as documents do
    (folder / "b.txt").write_text(TEXT[:cut])
    (folder / "sub" / "c.txt").write_text(TEXT[cut:])
    (folder / ".hidden").write_text("\x00 not part of the corpus")
    assert [p.name for p in prepare.text_files(folder)] == ["b.txt", "c.txt"]
    # Chunks of whole lines, streamed: the same tokens as encoding the joined text at once.
    assert "".join(prepare.chunks([folder / "b.txt", folder / "sub" / "c.txt"], 100)) == TEXT
    prepare.prepare(folder, tmp_path / "tok", "bpe:300")
    tok, splits, meta = tokenfile.open_tokens(tmp_path / "tok", "bpe", 300)
    with pytest.raises(UserError, match="made with tokenizer 'bpe:300'.*vocab_size=512"):
        tokenfile.open_tokens(tmp_path / "tok", "bpe", 512)
    whole = toklib.HFByteBPE.train(TEXT, 300)
    assert tok.vocab_size == whole.vocab_size and meta["tokenizer_spec"] == "bpe:300"
    np.testing.assert_array_equal(np.concatenate([splits["train"], splits["val"]]),
                                  whole.encode(TEXT))
    prepare.prepare(folder, folder / "tok", "char")  # into itself: its own .bin never read
    meta = prepare.prepare(folder, folder / "tok", "char", overwrite=True)
    assert meta["files"] == 2 and meta["characters"] == len(TEXT)


def test_bad_inputs_are_one_line_and_destroy_nothing(tmp_path, text_file, capsys):
    out = tmp_path / "tok"
    prepare.prepare(text_file, out, "char")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        prepare.prepare(tmp_path / "empty", out, "char", overwrite=True)
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(UserError, match="bin.txt is not UTF-8"):
        prepare.prepare(tmp_path / "bin.txt", out, "char", overwrite=True)
    with pytest.raises(UserError, match="already holds token files"):
        prepare.prepare(text_file, out, "char")
    with pytest.raises(UserError, match="unknown --tokenizer"):
        prepare.prepare(text_file, out, "words", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing destroyed
    assert prepare.main([str(tmp_path / "missing.txt"), f"--out={tmp_path / 'x'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err and "missing.txt" in err

    with pytest.raises(UserError, match="meta.json missing"):
        tokenfile.open_tokens(tmp_path)
    with pytest.raises(UserError, match="token folder not found"):
        corpuslib.token_corpus(tmp_path / "nowhere", "char")
    with pytest.raises(UserError, match="made with tokenizer 'char'.*tokenizer.name='bpe'"):
        tokenfile.open_tokens(out, "bpe", 512)
    with pytest.raises(UserError, match="too few for windows of context 4096"):
        corpuslib.token_corpus(out, "char", context=4096)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))  # dtype mismatch
    with pytest.raises(UserError, match="train.bin holds .* bytes but meta.json says .* uint32"):
        tokenfile.open_tokens(out, "char")
    (out / "meta.json").write_text(json.dumps(meta))
    toklib.CharTokenizer(list("abc")).save(out / "tokenizer.json")  # another tokenizer
    with pytest.raises(UserError, match="not the tokenizer that made these tokens"):
        tokenfile.open_tokens(out, "char")
    (out / "tokenizer.json").write_bytes(before["tokenizer.json"])
    (out / "val.bin").unlink()
    with pytest.raises(UserError, match="token file not found: .*val.bin"):
        tokenfile.open_tokens(out, "char")


def test_ch4_pretrains_from_token_files_like_from_text(tmp_path, shakespeare_path):
    """prepare -> ch4 smoke pretraining on the memmapped .bin. The token files hold the text
    path's tokens under the same tokenizer, so every batch (and with the same vocabulary and
    seed, every loss) is the text path's; measured: identical losses to the last bit."""
    prepare.main(["--tokenizer=char", f"--out={tmp_path / 'tok'}", str(shakespeare_path)])
    cfg = pretrain_config("smoke")
    cfg.lm.max_chars = 0
    cfg.data.path = str(shakespeare_path)
    text = ch4.load_corpus(cfg)
    cfg.data.name, cfg.data.path = "tokens", str(tmp_path / "tok")
    binary = ch4.load_corpus(cfg)
    assert isinstance(binary.train, np.memmap) and isinstance(binary.val, np.memmap)
    assert binary.tokenizer.chars == text.tokenizer.chars
    assert binary.fertility == pytest.approx(text.fertility)
    t, context = cfg.train, cfg.model.context
    for split in ("train", "val"):
        a = pipeline.lm_batches(getattr(text, split), t.batch_size, context, t.seed)
        b = pipeline.lm_batches(getattr(binary, split), t.batch_size, context, t.seed)
        for step in (0, 1, 19):
            np.testing.assert_array_equal(a[step]["inputs"], b[step]["inputs"])

    ch4.main(["--config=configs/ch4_gpt.py:smoke", "--config.train.steps=6",
              "--config.train.log_every=1", "--config.train.steps_per_call=2",
              "--config.lm.eval_batches=1", "--config.data.name=tokens",
              f"--config.data.path={tmp_path / 'tok'}", f"--workdir={tmp_path / 'bin'}"])
    rows = (tmp_path / "bin" / "metrics.jsonl").read_text().splitlines()
    losses = [r["train/loss"] for r in map(json.loads, rows) if "train/loss" in r]
    assert len(losses) == 3 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
