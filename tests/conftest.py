"""Test setup: 8 simulated CPU devices, compiled without LLVM's optimisation, set before jax is
imported anywhere; one persistent compilation cache per test run in a tmp dir (never
~/.cache), shared by the xdist workers and the commands the tests start: many tests build the
same small programs again (the same tiny GPT's step in the loop, the chapter CLIs the
in-process tests also run), and a program compiled once is then loaded. Removed when the run
ends. JAXCOURSE_CACHE=off turns it off."""
import os
import shutil
import tempfile

# The tests check what programs compute, never how fast they run: XLA CPU's LLVM optimisation
# is most of a small program's compile time, and off it the whole suite takes ~30% less.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Set once by the xdist controller (this file is imported there first); workers inherit it.
_OWN_CACHE = "JAXCOURSE_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["JAXCOURSE_CACHE"] = tempfile.mkdtemp(prefix="jaxcourse-test-xla-")
# Every figure a test run draws must have a title and labelled axes (jaxcourse/figures.py).
os.environ.setdefault("JAXCOURSE_STRICT_FIGURES", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from jaxcourse import machine  # noqa: E402

machine.compilation_cache()

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


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller, once
        shutil.rmtree(os.environ["JAXCOURSE_CACHE"], ignore_errors=True)
