"""Data sources, raw-format readers (on small files written here) and pipelines."""
import gzip
import io
import pickle

import numpy as np
import pytest

from jaxcourse.data import pipeline, sources
from jaxcourse.errors import UserError


def test_digits_split_is_deterministic():
    a, b = sources.load_digits(), sources.load_digits()
    assert a["x_train"].shape == (1438, 8, 8, 1) and a["x_test"].shape == (359, 8, 8, 1)
    assert a["x_train"].dtype == np.float32 and 0.0 <= a["x_train"].min() <= a["x_train"].max() <= 1.0
    np.testing.assert_array_equal(a["y_test"], b["y_test"])
    assert set(np.unique(a["y_train"])) == set(range(10))


def test_batches_cover_each_epoch_once_and_are_reproducible():
    arrays = {"i": np.arange(20), "x": np.arange(20) * 10}
    ds = pipeline.batches(arrays, 5, seed=3)
    epoch = np.concatenate([ds[k]["i"] for k in range(4)])
    assert sorted(epoch) == list(range(20))
    np.testing.assert_array_equal(ds[0]["x"], ds[0]["i"] * 10)
    assert not np.array_equal(np.concatenate([ds[k]["i"] for k in range(4, 8)]), epoch)
    np.testing.assert_array_equal(pipeline.batches(arrays, 5, seed=3)[7]["i"], ds[7]["i"])
    with pytest.raises(UserError, match="larger than the dataset"):
        pipeline.batches(arrays, 50, 0)


def test_eval_batches_keep_every_example_in_order():
    out = pipeline.eval_batches({"x": np.arange(7)}, 3)
    assert [b["x"].tolist() for b in out] == [[0, 1, 2], [3, 4, 5], [6]]


def test_lm_batches_are_shifted_windows():
    tokens = np.arange(100)
    ds = pipeline.lm_batches(tokens, 4, 8, seed=0)
    b = ds[5]
    assert b["inputs"].shape == (4, 8)
    np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
    np.testing.assert_array_equal(pipeline.lm_batches(tokens, 4, 8, 0)[5]["inputs"], b["inputs"])
    with pytest.raises(UserError, match="too short"):
        pipeline.lm_batches(np.arange(5), 2, 8, 0)


def test_stdlib_corpus_and_text_files(tmp_path):
    text = sources.stdlib_corpus(50_000)
    assert len(text) == 50_000 and "def " in text
    with pytest.raises(UserError, match="not found"):
        sources.read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        sources.read_text(tmp_path / "empty.txt")


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28))
    labels = np.array([0, 1, 2, 3, 4, 5])
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(labels))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images[:2])))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels[:2])))
    d = sources.read_mnist_idx(tmp_path)
    assert d["x_train"].shape == (6, 28, 28, 1) and d["x_test"].shape == (2, 28, 28, 1)
    np.testing.assert_allclose(d["x_train"][..., 0] * 255, images, atol=1e-3)
    np.testing.assert_array_equal(d["y_test"], [0, 1])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x09\x01junk")
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.*magic"):
        sources.read_mnist_idx(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(labels)[:-2])
    with pytest.raises(UserError, match="data bytes"):
        sources.read_mnist_idx(tmp_path)


def test_cifar10_reader_and_restricted_unpickler(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8),
                 b"labels": [1, 2, 3], b"batch_label": b"x"}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
    d = sources.read_cifar10(tmp_path)
    assert d["x_train"].shape == (15, 32, 32, 3) and d["y_test"].tolist() == [1, 2, 3]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UserError, match="test_batch.*refusing to load builtins.print"):
        sources.read_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3"):
        sources.read_cifar10(tmp_path)


# Damaged pickles that escaped the reader as raw exceptions, and the type each raised.
_BAD_PICKLES = {
    "unknown codec": (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x0d\x00\x00\x00"
                      b"no-such-codec\x86R.", LookupError),
    "length past the address space": (b"\x80\x04\x8e" + (2**63 + 5).to_bytes(8, "little"),
                                      OverflowError),
    "length of 4 EiB": (b"\x80\x04\x8e" + (2**62).to_bytes(8, "little"), MemoryError),
    "truncated": (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)[:-40],
                  Exception),
}


@pytest.mark.parametrize("name", sorted(_BAD_PICKLES))
def test_every_damaged_cifar_pickle_is_one_line_naming_the_file(tmp_path, name):
    raw, raw_error = _BAD_PICKLES[name]
    with pytest.raises(raw_error):  # what the unpickler itself raises: the case is real.
        sources._ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / batch).write_bytes(raw)
    with pytest.raises(UserError, match=r"corrupt CIFAR-10 batch .*data_batch_1: \w+") as e:
        sources.read_cifar10(tmp_path)
    assert len(str(e.value).splitlines()) == 1
