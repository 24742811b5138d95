import os
import shutil
import socket
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
    """One persistent compilation cache for the whole session (its xdist workers and the
    training processes tests start inherit the variable): the tests train the same tiny shapes
    again and again. Tests of the cache itself set `train.compilation_cache_dir` explicitly."""
    if not hasattr(config, "workerinput") and "GLAM_COMPILATION_CACHE_DIR" not in os.environ:
        config._glam_jax_cache = tempfile.mkdtemp(prefix="glam-test-jax-cache-")
        os.environ["GLAM_COMPILATION_CACHE_DIR"] = config._glam_jax_cache


def pytest_unconfigure(config):
    if getattr(config, "_glam_jax_cache", None):
        shutil.rmtree(config._glam_jax_cache, ignore_errors=True)


@pytest.fixture
def free_port():
    """A function returning a localhost TCP port nothing listens on (at the time of the call)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


# Prepared Python documentation (data=pydocs) with a small tokenizer, once per test process.
PYDOCS = ["data=pydocs", "data.tokenizer.vocab_size=512", "data.tokenizer.sample_chars=300000",
          "data.engine.workers=1"]


@pytest.fixture(scope="session")
def pydocs(tmp_path_factory):
    """Overrides that train on data=pydocs, prepared once under a session temporary folder."""
    from glam.data.prepare import prepare
    from glam.resolve import load_raw

    overrides = [*PYDOCS, f"data.prepared_dir={tmp_path_factory.mktemp('pydocs')}"]
    prepare(load_raw(overrides).data, progress=False)
    return overrides
