"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere; no persistent
compilation cache (tests must not write to ~/.cache; a test that wants one sets a tmp dir)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAXCOURSE_CACHE", "off")
# Every figure a test run draws must have a title and labelled axes (jaxcourse/figures.py).
os.environ.setdefault("JAXCOURSE_STRICT_FIGURES", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
# JAXCOURSE_SHAKESPEARE=path, else tinyshakespeare.txt in the checkout, else the shared copy.
SHAKESPEARE = next((p for p in (pathlib.Path(os.environ.get("JAXCOURSE_SHAKESPEARE", "/nonexistent")),
                                REPO / "tinyshakespeare.txt",
                                REPO.parent / "shared" / "data" / "tinyshakespeare.txt")
                    if p.is_file()), REPO / "tinyshakespeare.txt")


@pytest.fixture
def shakespeare_path():
    if not SHAKESPEARE.exists():
        pytest.skip(f"needs tiny Shakespeare: curl -o {SHAKESPEARE} {SHAKESPEARE_URL} "
                    "(or JAXCOURSE_SHAKESPEARE=PATH)")
    return SHAKESPEARE
