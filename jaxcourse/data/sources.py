"""Data sources: embedded defaults that work offline, local files, and tfds.

Every loader returns plain numpy arrays; a missing or corrupt file raises `UserError`
naming the file. CIFAR-10's python batches are pickles, read with an unpickler that
admits only containers and numpy arrays.
"""
import gzip
import io
import pathlib
import pickle
import sysconfig

import numpy as np

from jaxcourse.errors import UserError

Arrays = dict[str, np.ndarray]


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int = 0) -> Arrays:
    """Deterministic shuffled train/test split."""
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def load_digits() -> Arrays:
    """scikit-learn's 1,797 handwritten digits as [N, 8, 8, 1] floats in [0, 1]; 20% test."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    return _split(x, d.target.astype(np.int32), 0.2)


def stdlib_corpus(max_chars: int = 1_000_000) -> str:
    """Text built from the Python standard library's own source files (sorted, so stable)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise UserError(f"no Python sources found under {root} for the embedded corpus")
    return "".join(parts)[:max_chars]


def pydoc_corpus(max_chars: int = 1_000_000) -> str:
    """English prose: the Python documentation topics shipped in the standard library
    (`pydoc_data.topics`, the text `help()` shows), in sorted topic order."""
    from pydoc_data import topics  # pylint: disable=import-outside-toplevel

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:max_chars]


EMBEDDED_TEXT = {"stdlib": stdlib_corpus, "pydoc": pydoc_corpus}


def read_text(path: str | pathlib.Path) -> str:
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (byte {e.start})") from e
    if not text.strip():
        raise UserError(f"data file {path} is empty")
    return text


def load_text(data_cfg) -> str:
    """The text corpus named by a `data` config section: `data.path`, or an embedded corpus
    (`stdlib`: Python source code, the default; `pydoc`: English documentation prose)."""
    if data_cfg.name == "tokens":
        raise UserError("data.name='tokens' holds token ids, not text; this experiment needs "
                        "text: data.name=stdlib or pydoc, or data.path=FILE")
    if data_cfg.path:
        return read_text(data_cfg.path)
    return embedded_text(data_cfg.name or "stdlib")


def embedded_text(name: str) -> str:
    if name == "text":
        name = "stdlib"
    if name not in EMBEDDED_TEXT:
        raise UserError(f"unknown text data.name={name!r}; use one of "
                        f"{', '.join(EMBEDDED_TEXT)} or set data.path")
    return EMBEDDED_TEXT[name]()


# --- MNIST idx -------------------------------------------------------------------------

def _open_maybe_gz(folder: pathlib.Path, name: str) -> bytes:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            raw = candidate.read_bytes()
            if candidate.suffix == ".gz":
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError) as e:
                    raise UserError(f"corrupt gzip file {candidate}: {e}") from e
            return raw
    raise UserError(f"data file not found: {folder / name} (or .gz)")


def read_idx(raw: bytes, name: str) -> np.ndarray:
    """Parses the idx format (big-endian header: magic, dims) of MNIST's files."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{name} is not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{name} is truncated (header)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise UserError(f"{name} has {len(raw) - header} data bytes, expected {size} for {dims}")
    return np.frombuffer(raw, np.uint8, size, header).reshape(dims)


def read_mnist_idx(folder: str | pathlib.Path) -> Arrays:
    """MNIST (or Fashion-MNIST) from the four idx files in `folder`, [N, 28, 28, 1] in [0, 1]."""
    folder = pathlib.Path(folder)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_open_maybe_gz(folder, f"{prefix}-images-idx3-ubyte"),
                          f"{folder}/{prefix}-images-idx3-ubyte")
        labels = read_idx(_open_maybe_gz(folder, f"{prefix}-labels-idx1-ubyte"),
                          f"{folder}/{prefix}-labels-idx1-ubyte")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"MNIST {split} files in {folder} disagree: images {images.shape}, "
                            f"labels {labels.shape}")
        out[f"x_{split}"] = (images.astype(np.float32) / 255.0)[..., None]
        out[f"y_{split}"] = labels.astype(np.int32)
    return out


# --- CIFAR-10 python batches ----------------------------------------------------------------

class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits plain containers and numpy arrays; any other global is refused."""
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # bytes in protocol 2
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: pathlib.Path, label_key: bytes = b"labels",
                      what: str = "CIFAR-10 batch") -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        d = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(d[b"data"], np.uint8)
        labels = np.asarray(d[label_key], np.int32)
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways (LookupError,
        # OverflowError, MemoryError, ...): every one is a corrupt file, not a bug.
        text = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"corrupt {what} {path}: {type(e).__name__}: {text}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise UserError(f"corrupt {what} {path}: data {data.shape}, labels {labels.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_arrays(train: list, test: tuple) -> Arrays:
    scale = lambda x: x.astype(np.float32) / 255.0  # noqa: E731
    return {"x_train": scale(np.concatenate([x for x, _ in train])),
            "y_train": np.concatenate([y for _, y in train]),
            "x_test": scale(test[0]), "y_test": test[1]}


def _unpacked(folder: str | pathlib.Path, inner: str) -> pathlib.Path:
    folder = pathlib.Path(folder)
    return folder / inner if (folder / inner).is_dir() else folder


def read_cifar10(folder: str | pathlib.Path) -> Arrays:
    """CIFAR-10 from `folder` (the unpacked cifar-10-batches-py), [N, 32, 32, 3] in [0, 1]."""
    folder = _unpacked(folder, "cifar-10-batches-py")
    return _cifar_arrays([_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)],
                         _read_cifar_batch(folder / "test_batch"))


def read_cifar100(folder: str | pathlib.Path) -> Arrays:
    """CIFAR-100 from `folder` (the unpacked cifar-100-python: its `train` and `test` files),
    [N, 32, 32, 3] in [0, 1], with the 100 fine labels."""
    folder = _unpacked(folder, "cifar-100-python")
    read = lambda name: _read_cifar_batch(folder / name, b"fine_labels",  # noqa: E731
                                          "CIFAR-100 file")
    return _cifar_arrays([read("train")], read("test"))


class SourceColumn:
    """One feature of a random-access source (`tfds.data_source`: `len` and `source[i]` ->
    dict of numpy arrays) over a range of its records, read only when indexed: `col[idx]`
    with an integer array reads those records, `col[a:b]` is a lazy sub-range,
    `np.asarray(col)` reads them all. Images are scaled to float32 in [0, 1]."""

    def __init__(self, source, key: str, image: bool, index: range | None = None,
                 item_shape: tuple[int, ...] | None = None):
        self.source, self.key, self.image = source, key, image
        self.index = range(len(source)) if index is None else index
        if item_shape is None:  # one record read, once: every record has this shape
            item_shape = np.shape(source[self.index[0]][key]) if len(self.index) else ()
        self.item_shape = tuple(item_shape)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),) + self.item_shape

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return SourceColumn(self.source, self.key, self.image, self.index[idx],
                                self.item_shape)
        idx = np.asarray(idx)
        rows = [np.asarray(self.source[self.index[int(i)]][self.key]) for i in idx.reshape(-1)]
        x = np.stack(rows) if rows else np.zeros((0,) + self.item_shape)
        x = x.astype(np.float32) / 255.0 if self.image else x.astype(np.int32)
        return x.reshape(idx.shape + self.item_shape)

    def __array__(self, dtype=None, copy=None):
        x = self[np.arange(len(self))]
        return x if dtype is None else x.astype(dtype)


def tfds_arrays(sources_by_split: dict, image_key: str = "image",
                label_key: str = "label") -> Arrays:
    """x_/y_ columns of random-access sources per split: images lazy (read by the batches
    that use them), labels read once (small, and chapters need their range)."""
    out = {}
    for split, source in sources_by_split.items():
        if len(source) == 0:
            raise UserError(f"tfds split {split!r} is empty")
        out[f"x_{split}"] = SourceColumn(source, image_key, image=True)
        out[f"y_{split}"] = np.asarray(SourceColumn(source, label_key, image=False))
    return out


def load_tfds(name: str) -> Arrays:
    """A tfds image-classification set through `tfds.data_source` random access: records
    are read as batches ask for them, never the whole set into memory (needs the `tfds`
    extra, and the set prepared once with network access)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError("data.name='tfds:...' needs tensorflow_datasets: "
                        "pip install -e '.[tfds]'") from None
    try:
        found = {split: tfds.data_source(name, split=split) for split in ("train", "test")}
    except Exception as e:  # noqa: BLE001 - tfds raises many types (not found, no network).
        raise UserError(f"tfds cannot open {name!r}: {type(e).__name__}: {e}") from None
    return tfds_arrays(found)


def load_images(data_cfg) -> Arrays:
    """Image classification arrays for a `data` config section (name + path)."""
    name = data_cfg.name
    if name == "digits":
        return load_digits()
    readers = {"mnist": read_mnist_idx, "cifar10": read_cifar10, "cifar100": read_cifar100}
    if name in readers:
        if not data_cfg.path:
            raise UserError(f"data.name={name!r} needs data.path=<folder with the raw files>")
        if not pathlib.Path(data_cfg.path).is_dir():
            raise UserError(f"data folder not found: {data_cfg.path}")
        return readers[name](data_cfg.path)
    if name.startswith("tfds:"):
        return load_tfds(name.removeprefix("tfds:"))
    raise UserError(f"unknown data.name={name!r}; use digits, mnist, cifar10, cifar100 or "
                    "tfds:<name>")
