"""Tokenize a text file or folder once into token files (`data/tokenfile.py`).

    python -m jaxcourse.data.prepare --tokenizer=char --out=runs/tokens/shakespeare \\
        ../shared/data/tinyshakespeare.txt
    python -m jaxcourse.data.prepare --tokenizer=bpe:4096 --out=DIR path/to/folder
    python -m jaxcourse.ch4 --config=configs/ch4_gpt.py:cpu --config.data.name=tokens \\
        --config.data.path=runs/tokens/shakespeare

--tokenizer: char | bpe:VOCAB (the `tokenizers` package's byte-level BPE) |
bpe_scratch:VOCAB (the lesson's BPE; reads the whole text into memory) | file:PATH (an
existing tokenizer.json, e.g. a trained model's). A folder's files (every file below it, in
sorted path order, hidden ones skipped) are read as UTF-8 text and joined as they are. The text
streams through in chunks of whole lines, so neither it nor its tokens need to fit in memory;
chunks are ~16 MB, so a smaller file encodes exactly as `lm.load_corpus` encodes it whole.
The first 1 - val_fraction of the tokens go to train.bin, the rest to val.bin (nanoGPT's
split). Files are written under temporary names and renamed at the end: a failed run leaves
the folder as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Iterator

import numpy as np

from jaxcourse.data import tokenfile
from jaxcourse.data import tokenizers as toklib
from jaxcourse.errors import UserError

CHUNK_CHARS = 1 << 24


def text_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """The file itself, or every non-hidden file below a folder, sorted."""
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"text file or folder not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UserError(f"folder {path} holds no files to tokenize")
    return files


def chunks(files: list[pathlib.Path], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The text in pieces of whole lines (about chunk_chars characters each)."""
    for f in files:
        parts, size = [], 0
        try:
            with open(f, encoding="utf-8") as stream:
                for line in stream:
                    parts.append(line)
                    size += len(line)
                    if size >= chunk_chars:
                        yield "".join(parts)
                        parts, size = [], 0
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 text ({e.reason})") from None
        if parts:
            yield "".join(parts)


def make_tokenizer(spec: str, files: list[pathlib.Path]) -> tuple[toklib.Tokenizer, int]:
    """(tokenizer, requested vocab size) for a --tokenizer spec, trained on the files."""
    name, _, arg = spec.partition(":")
    if name == "file":
        tok = toklib.load_tokenizer(arg)
        return tok, tok.vocab_size
    if name == "char":
        chars = set()
        for c in chunks(files):
            chars.update(c)
        if not chars:
            raise UserError(f"no text in {', '.join(map(str, files[:3]))}")
        return toklib.CharTokenizer(sorted(chars)), 0
    if name in ("bpe", "bpe_scratch"):
        try:
            vocab = int(arg)
        except ValueError:
            raise UserError(f"--tokenizer={spec}: give the vocabulary size, e.g. {name}:4096") from None
        if name == "bpe_scratch":
            return toklib.ScratchBPE.train("".join(chunks(files)), vocab), vocab
        lines = (line for c in chunks(files) for line in c.splitlines(keepends=True))
        return toklib.HFByteBPE.train_from_lines(lines, vocab), vocab
    raise UserError(f"unknown --tokenizer={spec!r}; use char, bpe:VOCAB, bpe_scratch:VOCAB "
                    "or file:PATH")


def prepare(source: str | pathlib.Path, out: str | pathlib.Path, tokenizer: str = "char",
            val_fraction: float = 0.1, overwrite: bool = False) -> dict:
    """Writes out/{train,val}.bin, tokenizer.json and meta.json; returns the meta."""
    out = pathlib.Path(out)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction={val_fraction} must be between 0 and 1")
    if (out / "meta.json").exists() and not overwrite:
        raise UserError(f"{out} already holds token files; pass --overwrite to replace them")
    inside = out.resolve()  # a folder prepared into itself: never read its own token files
    files = [f for f in text_files(source) if inside not in f.resolve().parents]
    if not files:
        raise UserError(f"{source} holds no files to tokenize outside {out}")
    tok, requested = make_tokenizer(tokenizer, files)
    dtype = tokenfile.dtype_for(tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: out / f".{name}.tmp" for name in ("train.bin", "val.bin", "tokenizer.json",
                                                    "meta.json")}
    try:
        n, chars, words = 0, 0, 0
        with open(tmp["train.bin"], "wb") as f:
            for c in chunks(files):
                ids = np.asarray(tok.encode(c), dtype)
                ids.tofile(f)
                n, chars, words = n + len(ids), chars + len(c), words + len(c.split())
        n_train = int(n * (1.0 - val_fraction))
        if n_train < 2 or n - n_train < 2:
            raise UserError(f"{source} has {n} tokens: too few to split into train and val")
        _move_tail(tmp["train.bin"], tmp["val.bin"], n_train, dtype)
        tok.save(tmp["tokenizer.json"])
        meta = {"format": tokenfile.FORMAT, "dtype": dtype.name,
                "tokenizer": toklib.kind(tok), "tokenizer_spec": tokenizer,
                "vocab_size": tok.vocab_size, "requested_vocab_size": requested or tok.vocab_size,
                "tokenizer_sha256": tokenfile.sha256(tmp["tokenizer.json"]),
                "tokens": {"train": n_train, "val": n - n_train}, "val_fraction": val_fraction,
                "source": str(source), "files": len(files), "characters": chars, "words": words}
        tmp["meta.json"].write_text(json.dumps(meta, indent=1))
        for name, path in tmp.items():  # meta.json last: a folder with it is complete.
            os.replace(path, out / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return meta


def _move_tail(train: pathlib.Path, val: pathlib.Path, start: int, dtype: np.dtype) -> None:
    """Copies tokens start.. of `train` to `val` in bounded chunks, then truncates `train`."""
    tokens = np.memmap(train, dtype=dtype, mode="r")
    with open(val, "wb") as f:
        for i in range(start, len(tokens), CHUNK_CHARS):
            np.asarray(tokens[i:i + CHUNK_CHARS]).tofile(f)
    del tokens
    os.truncate(train, start * dtype.itemsize)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxcourse.data.prepare",
        description="Tokenize a text file or folder into train.bin / val.bin token files.")
    parser.add_argument("source", help="a UTF-8 text file, or a folder of them")
    parser.add_argument("--out", required=True, help="folder for the token files")
    parser.add_argument("--tokenizer", default="char",
                        help="char | bpe:VOCAB | bpe_scratch:VOCAB | file:PATH (default char)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="held-out tail of the tokens (default 0.1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace token files already in --out")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.source, args.out, args.tokenizer, args.val_fraction, args.overwrite)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {meta['tokens']['train']} train + {meta['tokens']['val']} val {meta['dtype']} "
          f"tokens ({meta['tokenizer_spec']}, vocab {meta['vocab_size']}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
