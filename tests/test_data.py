"""Data sources, raw-format readers (on small files written here) and pipelines."""
import gzip
import io
import pickle

import ml_collections
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


def test_each_shard_materialises_only_its_rows():
    """Shard i of n gets rows [i*B/n, (i+1)*B/n) of the one-process batch, and reads only
    those: the rows a shard's source returns are counted."""
    arrays = {"i": np.arange(40), "x": np.arange(40) * 10}
    whole = pipeline.batches(arrays, 8, seed=1)
    halves = [pipeline.batches(arrays, 8, 1, shard=pipeline.ShardOptions(k, 2)) for k in (0, 1)]
    for step in (0, 3, 9):
        got = [h[step] for h in halves]
        assert [len(g["i"]) for g in got] == [4, 4]
        np.testing.assert_array_equal(np.concatenate([g["x"] for g in got]), whole[step]["x"])

    class Counting(np.ndarray):  # a token array that counts the elements read from it
        read = 0

        def __getitem__(self, idx):
            Counting.read += np.size(np.asarray(idx)) if not isinstance(idx, slice) else 0
            return np.asarray(self).__getitem__(idx)

    tokens = np.arange(10_000).view(Counting)
    lm_whole = pipeline.lm_batches(np.arange(10_000), 8, 16, seed=2)
    lm_half = pipeline.lm_batches(tokens, 8, 16, 2, shard=pipeline.ShardOptions(1, 2))
    b = lm_half[5]
    assert b["inputs"].shape == (4, 16) and Counting.read == 4 * 17  # 4 windows, nothing more
    np.testing.assert_array_equal(b["inputs"], lm_whole[5]["inputs"][4:])
    assert pipeline.local_rows(8) == slice(0, 8)  # one process: every row
    with pytest.raises(UserError, match="cannot be split evenly over 3"):
        pipeline.batches(arrays, 8, 0, shard=pipeline.ShardOptions(0, 3))


class FakeDataSource:
    """What `tfds.data_source` returns: a length and random access to one record's features."""

    def __init__(self, n, shape=(4, 4, 1)):
        self.n, self.shape, self.reads = n, shape, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads += 1
        return {"image": np.full(self.shape, i % 256, np.uint8), "label": np.int64(i % 10)}


def test_tfds_sources_are_read_by_random_access():
    train, test = FakeDataSource(50), FakeDataSource(12)
    d = sources.tfds_arrays({"train": train, "test": test})
    assert d["y_train"].dtype == np.int32 and d["y_train"].tolist() == [i % 10 for i in range(50)]
    assert d["x_train"].shape == (50, 4, 4, 1) and len(d["x_train"][10:]) == 40
    train.reads = 0
    b = pipeline.batches({"image": d["x_train"][10:], "label": d["y_train"][10:]}, 8, 0)[2]
    assert train.reads == 8  # one record per row of the batch, not the whole split
    assert b["image"].dtype == np.float32 and b["image"].shape == (8, 4, 4, 1)
    np.testing.assert_array_equal(np.rint(b["image"][:, 0, 0, 0] * 255) % 10, b["label"])
    evals = pipeline.eval_batches({"image": d["x_test"], "label": d["y_test"]}, 5)
    assert [len(e["image"]) for e in evals] == [5, 5, 2] and isinstance(evals[0]["image"], np.ndarray)
    np.testing.assert_allclose(evals[2]["image"][:, 0, 0, 0] * 255, [10, 11])
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs tensorflow_datasets"):
            sources.load_tfds("mnist")


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


def test_cifar100_reader_fine_labels_and_one_line_errors(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-100-python"  # the unpacked archive's folder, found inside data.path
    root.mkdir()
    images = {}
    for name, n in (("train", 4), ("test", 2)):
        images[name] = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        batch = {b"data": images[name], b"fine_labels": list(range(90, 90 + n)),
                 b"coarse_labels": [7] * n, b"filenames": [b"f"] * n}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    d = sources.read_cifar100(tmp_path)
    assert d["x_train"].shape == (4, 32, 32, 3) and d["x_test"].dtype == np.float32
    assert d["y_train"].tolist() == [90, 91, 92, 93] and d["y_test"].tolist() == [90, 91]
    # channel-major rows: the first 1024 bytes are the red plane
    np.testing.assert_allclose(d["x_test"][1, :, :, 0].reshape(-1),
                               images["test"][1, :1024] / 255.0)
    loaded = sources.load_images(ml_collections.ConfigDict({"name": "cifar100",
                                                            "path": str(tmp_path)}))
    assert loaded["y_test"].tolist() == [90, 91]
    (root / "test").write_bytes(pickle.dumps({b"data": images["test"], b"labels": [1, 2]}))
    with pytest.raises(UserError, match=r"corrupt CIFAR-100 file .*test: KeyError"):
        sources.read_cifar100(tmp_path)
    (root / "train").unlink()
    with pytest.raises(UserError, match="data file not found: .*train"):
        sources.read_cifar100(tmp_path)
