"""Tokenizers behind one small interface: characters, a from-scratch byte-level BPE, and HF `tokenizers`.

Every tokenizer has `vocab_size`, `encode(text) -> list[int]`, `decode(ids) -> str` and
`save(path)` (JSON); `load_tokenizer(path)` reads any of them back. `make_tokenizer(name, text,
vocab_size)` trains one on a corpus:

    "char"         one id per distinct character of the corpus (vocab_size is ignored).
    "bpe_scratch"  byte-level BPE written out in ~100 lines for the lesson (Sennrich et al. 2016,
                 with GPT-2's byte alphabet so any string round-trips).
    "bpe"          the `tokenizers` package's ByteLevel BPE: the same algorithm in Rust, for real use.

`fertility(tok, text)` = tokens per whitespace-separated word, the usual measure of how well a
vocabulary fits a corpus (1.0 means one token per word; characters give ~5 on English).
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import time
from typing import Iterable, Protocol, Sequence

from jaxcourse.errors import UserError

NAMES = ("char", "bpe_scratch", "bpe")

# GPT-2-style pre-tokenization: words keep their leading space, digits / punctuation / whitespace
# runs are separate pieces. Merges never cross a piece boundary, which keeps training cheap (we
# count unique pieces, not positions) and tokens word-like. Every character matches one branch
# ([^\W\d_] letters, \d digits, [^\s\w]|_ the rest, \s whitespace), so pieces concatenate back
# to the text exactly.
_PIECE_RE = re.compile(
        r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: str | pathlib.Path) -> None: ...


def _check_corpus(text: str) -> None:
    if not text:
        raise UserError("empty corpus: cannot build a tokenizer from no text")


def _write_json(path, obj) -> None:
    pathlib.Path(path).write_text(json.dumps(obj, ensure_ascii=False))


class CharTokenizer:
    """One id per character, ids in sorted character order (nanoGPT's shakespeare_char vocabulary)."""

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self._index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        _check_corpus(text)
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path) -> None:
        _write_json(path, {"kind": "char", "chars": self.chars})


class ScratchBPE:
    """Byte-level BPE: ids 0..255 are bytes, id 256+k is the k-th learned merge (a pair of ids)."""

    def __init__(self, merges: Sequence[tuple[int, int]]):
        self.merges = [tuple(m) for m in merges]
        self._rank = {pair: 256 + k for k, pair in enumerate(self.merges)}
        self._bytes = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self.vocab_size = 256 + len(self.merges)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, vocab_size: int) -> ScratchBPE:
        """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: the smallest pair)."""
        _check_corpus(text)
        if vocab_size < 256:
            raise UserError(f"bpe vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
        counts = collections.Counter(_PIECE_RE.findall(text))
        words = [list(w.encode("utf-8")) for w in counts]
        freq = list(counts.values())
        # Pair statistics are updated incrementally: a merge only touches the words holding the pair.
        pair_count: collections.Counter = collections.Counter()
        where = collections.defaultdict(set)
        for i, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pair_count[pair] += freq[i]
                where[pair].add(i)
        merges = []
        while len(merges) < vocab_size - 256 and pair_count:
            best = max(pair_count.items(), key=lambda kv: (kv[1], (-kv[0][0], -kv[0][1])))[0]
            if pair_count[best] < 1:
                break
            new_id = 256 + len(merges)
            merges.append(best)
            for i in list(where[best]):
                old = words[i]
                for pair in zip(old, old[1:]):
                    pair_count[pair] -= freq[i]
                    if pair_count[pair] <= 0:
                        del pair_count[pair]
                words[i] = _merge(old, best, new_id)
                for pair in zip(words[i], words[i][1:]):
                    pair_count[pair] += freq[i]
                    where[pair].add(i)
            del where[best]
        return cls(merges)

    def _encode_piece(self, piece: str) -> list[int]:
        if piece not in self._cache:
            ids = list(piece.encode("utf-8"))
            while len(ids) > 1:
                # Apply the earliest-learned merge present, exactly the order training created them.
                pair = min(zip(ids, ids[1:]), key=lambda p: self._rank.get(p, 1 << 60))
                if pair not in self._rank:
                    break
                ids = _merge(ids, pair, self._rank[pair])
            self._cache[piece] = ids
        return self._cache[piece]

    def encode(self, text: str) -> list[int]:
        return [i for piece in _PIECE_RE.findall(text) for i in self._encode_piece(piece)]

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self._bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    def save(self, path) -> None:
        _write_json(path, {"kind": "bpe_scratch", "merges": [list(m) for m in self.merges]})


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class HFByteBPE:
    """The `tokenizers` package's byte-level BPE (or any `tokenizers.Tokenizer`) behind the same
    interface. `save` writes a standard `tokenizer.json`, the file `tokenizers.Tokenizer.from_file`
    and `transformers` read; `load_tokenizer` reads such a file, whoever wrote it."""

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> HFByteBPE:
        _check_corpus(text)
        # The corpus goes in as lines (newlines kept) so the Rust trainer can parallelise.
        return cls.train_from_lines(text.splitlines(keepends=True), vocab_size)

    @classmethod
    def train_from_lines(cls, lines: Iterable[str], vocab_size: int) -> HFByteBPE:
        """Trains on an iterable of lines (newlines kept), e.g. streamed from files larger
        than memory (`data.prepare`)."""
        if vocab_size < 256:
            raise UserError(f"bpe vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
        import tokenizers  # noqa: PLC0415 - the Rust package loads only for "bpe".
        from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415
        # GPT-2's byte-level BPE: bytes mapped to printable characters before the split, so
        # every string round-trips and no token is unknown.
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(lines, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, path) -> None:
        self._tok.save(str(path))


def make_tokenizer(name: str, text: str, vocab_size: int = 512) -> Tokenizer:
    """Train the tokenizer `name` ("char" | "bpe_scratch" | "bpe") on `text`."""
    if name == "char":
        return CharTokenizer.from_text(text)
    if name == "bpe_scratch":
        return ScratchBPE.train(text, vocab_size)
    if name == "bpe":
        return HFByteBPE.train(text, vocab_size)
    raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(NAMES)}")


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """Reads a file written by `save`, or any standard `tokenizers` tokenizer.json."""
    try:
        text = pathlib.Path(path).read_text()
        obj = json.loads(text)
        # A standard tokenizer.json has a "model" section; our own files have a "kind".
        kind = "tokenizers" if isinstance(obj, dict) and "model" in obj else obj["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read tokenizer file {path}: {e}") from None
    if kind == "char":
        return CharTokenizer(obj["chars"])
    if kind == "bpe_scratch":
        return ScratchBPE(obj["merges"])
    if kind in ("tokenizers", "bpe"):  # "bpe": the wrapped form earlier versions saved.
        import tokenizers  # noqa: PLC0415 - the Rust package loads only for these files.
        try:
            return HFByteBPE(tokenizers.Tokenizer.from_str(text if kind == "tokenizers"
                                                           else obj["tokenizer"]))
        except Exception as e:  # noqa: BLE001 - the Rust parser raises plain Exception.
            raise UserError(f"cannot read tokenizer file {path}: {e}") from None
    raise UserError(f"tokenizer file {path} has unknown kind {kind!r}")


def kind(tok: Tokenizer) -> str:
    """The `make_tokenizer` name of a tokenizer object ("char", "bpe_scratch" or "bpe")."""
    return {CharTokenizer: "char", ScratchBPE: "bpe_scratch", HFByteBPE: "bpe"}[type(tok)]


def fertility(tok: Tokenizer, text: str) -> float:
    """Tokens per whitespace-separated word of `text`."""
    n_words = len(text.split())
    if n_words == 0:
        raise UserError("fertility needs text with at least one word")
    return len(tok.encode(text)) / n_words


def compare(text: str, names: Sequence[str], vocab_sizes: Sequence[int]) -> list[dict]:
    """Trains every tokenizer (BPEs at every vocab size) on `text`: fertility, characters per
    token, training and encoding seconds. Raises if one does not round-trip the text."""
    rows = []
    for name in names:
        for size in ((0,) if name == "char" else tuple(vocab_sizes)):
            t0 = time.perf_counter()
            tok = make_tokenizer(name, text, size)
            t1 = time.perf_counter()
            ids = tok.encode(text)
            t2 = time.perf_counter()
            if tok.decode(ids) != text:
                raise UserError(f"tokenizer {name} does not round-trip this corpus")
            rows.append({"tokenizer": name, "vocab_size": tok.vocab_size,
                         "fertility": fertility(tok, text), "chars_per_token": len(text) / len(ids),
                         "train_s": t1 - t0, "encode_s": t2 - t1})
    return rows
