"""Set-up for every test: the checkout and ``tests/`` on ``sys.path`` (the tools, the ``helpers`` package), one
JAX compilation cache per worker, the shared tiny projects as session fixtures, and the ``slow`` files first."""

import math
import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

# One persistent JAX compilation cache per test worker, inherited by the tools the tests run as
# subprocesses: the same tiny models are compiled once, not once per process (numerics unchanged).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="knnlm-test-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]


def pytest_unconfigure(config):
    import shutil

    if "_OWN_CACHE" in globals():
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def wikitext_dir(tmp_path):
    """A small WikiText-format corpus directory."""
    from helpers import write_corpus

    return write_corpus(tmp_path / "corpus", 400, 40, 40)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """A tiny run and its complete train datastore, not indexed: made once per worker, never changed."""
    from helpers.tiny_run import built_datastore

    return built_datastore(tmp_path_factory.mktemp("datastore"))


@pytest.fixture(scope="session")
def ev(tmp_path_factory):
    """A tiny run, its train datastore with a Flat index and its token arrays: made once per worker; tests add
    datastores and outputs beside it, never change what is there."""
    from helpers.tiny_run import tiny_project

    return tiny_project(tmp_path_factory.mktemp("evaluation"))


def pytest_collection_modifyitems(session, config, items):
    """The longest files first: `make test` gives each of its 2 workers whole files (--dist loadfile) in
    collection order (--no-loadscope-reorder: xdist's default order is by test count, which put the one-test
    replication suite last, to run alone at the end). A long file marks its tests ``slow(rank)``, rank 1 the
    longest as measured (149 s ... 34 s for rank 11); a ``slow`` without rank comes after the ranked ones.
    Stable sort: every other file, and the order inside each file, stay as they were."""
    rank = {}
    for item in items:
        mark = item.get_closest_marker("slow")
        if mark is not None:
            r = mark.args[0] if mark.args else math.inf
            rank[item.path] = min(r, rank.get(item.path, math.inf))
    items.sort(key=lambda item: (item.path not in rank, rank.get(item.path, 0)))
