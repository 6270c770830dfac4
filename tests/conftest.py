"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere; no persistent
compilation cache (tests must not write to ~/.cache; a test that wants one sets a tmp dir)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAXCOURSE_CACHE", "off")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def shakespeare_path():
    if not SHAKESPEARE.exists():
      pytest.skip(f"{SHAKESPEARE} not present")
    return SHAKESPEARE
