"""Token files: a corpus tokenized once (`python -m jaxcourse.data.prepare`), read through
`np.memmap`, so a corpus larger than memory trains by reading only the windows it samples.

A token folder holds

    train.bin, val.bin   the token ids back to back, no header (nanoGPT's .bin files):
                         uint16 when the vocabulary fits in 65,536 ids, else uint32
    tokenizer.json       the tokenizer that made them (`tokenizers.load_tokenizer`)
    meta.json            the sidecar: format, dtype, tokenizer kind and spec, vocab_size,
                         the tokenizer file's sha256, token counts per split, source

Everything is checked when the folder is opened: a missing file, a .bin whose size is not
its token count in its dtype, a tokenizer.json that is not the one that made the tokens, or a
tokenizer that differs from the one the config asks for is one `UserError` line.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from jaxcourse.data import tokenizers as toklib
from jaxcourse.errors import UserError

FORMAT = "jaxcourse-tokens/1"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")
HINT = "make them with python -m jaxcourse.data.prepare --out=DIR FILE_OR_FOLDER"


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def read_meta(folder: str | pathlib.Path) -> dict:
    """meta.json of a token folder, checked for format and dtype."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise UserError(f"token folder not found: {folder} ({HINT})")
    path = folder / "meta.json"
    if not path.is_file():
        raise UserError(f"no token files in {folder} (meta.json missing); {HINT}")
    try:
        meta = json.loads(path.read_text())
        fmt, dtype = meta["format"], meta["dtype"]
        int(meta["vocab_size"]), meta["tokenizer"], meta["tokens"]["train"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__} {e}") from None
    if fmt != FORMAT:
        raise UserError(f"{path} has format {fmt!r}, expected {FORMAT!r}; {HINT}")
    if dtype not in DTYPES:
        raise UserError(f"{path} names dtype {dtype!r}; token files are {' or '.join(DTYPES)}")
    return meta


def open_split(folder: str | pathlib.Path, split: str, meta: dict | None = None) -> np.memmap:
    """The tokens of one split as a read-only memmap (nothing is read until indexed)."""
    folder = pathlib.Path(folder)
    meta = read_meta(folder) if meta is None else meta
    path = folder / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"token file not found: {path}; {HINT}")
    dtype = np.dtype(meta["dtype"])
    n = int(meta["tokens"].get(split, -1))
    size = path.stat().st_size
    if size != n * dtype.itemsize:
        raise UserError(f"{path} holds {size} bytes but meta.json says {n} {dtype.name} tokens "
                        f"({n * dtype.itemsize} bytes); the files disagree, re-run prepare")
    if n == 0:
        raise UserError(f"token file {path} is empty")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def load_tokenizer(folder: str | pathlib.Path, meta: dict | None = None) -> toklib.Tokenizer:
    """The folder's tokenizer.json, refused unless it is the file that made the tokens."""
    folder = pathlib.Path(folder)
    meta = read_meta(folder) if meta is None else meta
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}; {HINT}")
    if meta.get("tokenizer_sha256") not in (None, sha256(path)):
        raise UserError(f"{path} is not the tokenizer that made these tokens (sha256 differs "
                        "from meta.json); re-run prepare")
    tok = toklib.load_tokenizer(path)
    if tok.vocab_size != int(meta["vocab_size"]):
        raise UserError(f"{path} has {tok.vocab_size} tokens but meta.json says "
                        f"{meta['vocab_size']}; re-run prepare")
    return tok


def check_tokenizer(meta: dict, folder, name: str, vocab_size: int) -> None:
    """Refuses token files made by another tokenizer than the config's tokenizer section."""
    made, spec = meta["tokenizer"], meta.get("tokenizer_spec", meta["tokenizer"])
    if name != made:
        raise UserError(f"token files in {folder} were made with tokenizer {spec!r} (vocab "
                        f"{meta['vocab_size']}) but tokenizer.name={name!r}; set "
                        f"--config.tokenizer.name={made} or re-run prepare")
    requested = int(meta.get("requested_vocab_size", meta["vocab_size"]))
    if made != "char" and vocab_size and vocab_size != requested:
        raise UserError(f"token files in {folder} were made with tokenizer {spec!r} but "
                        f"tokenizer.vocab_size={vocab_size}; set "
                        f"--config.tokenizer.vocab_size={requested} or re-run prepare")


def open_tokens(folder: str | pathlib.Path, tokenizer: str | None = None, vocab_size: int = 0):
    """(tokenizer, {"train": memmap, "val": memmap}, meta) of a prepared token folder;
    with `tokenizer`, refuses files made by another tokenizer."""
    folder = pathlib.Path(folder)
    meta = read_meta(folder)
    if tokenizer is not None:
        check_tokenizer(meta, folder, tokenizer, vocab_size)
    tok = load_tokenizer(folder, meta)
    splits = {s: open_split(folder, s, meta) for s in SPLITS}
    return tok, splits, meta
