"""A datastore built from a real TFDS dataset (ArrayRecord, written from local text) equals the WikiText build."""

import os

import numpy as np

from helpers import ROOT, write_corpus
from helpers.tfds_fixture import write_tfds_wikitext
from helpers.tiny_run import make_run
from helpers.tools import build_py, manifest


def test_tfds_corpus_builds_the_same_datastore_as_its_wikitext_directory(tmp_path):
    corpus_dir = write_corpus(tmp_path / "corpus", n_train=40)
    workdir = str(tmp_path / "runs" / "tiny")
    make_run(corpus_dir, workdir)
    spec = write_tfds_wikitext(corpus_dir, str(tmp_path / "tfds"))
    out = build_py("--workdir", workdir, "--datastore", "text", "--corpus", corpus_dir, "--no-index", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = build_py("--workdir", workdir, "--datastore", "catalog", "--corpus", spec, "--tfds-data-dir",
                   str(tmp_path / "tfds"), "--no-index", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text, catalog = (os.path.join(workdir, "datastores", n) for n in ("text", "catalog"))
    assert manifest(catalog)["corpus"].startswith("tfds:") and manifest(catalog)["status"] == "complete"
    assert manifest(catalog)["corpus_sha256"] == manifest(text)["corpus_sha256"]
    for name in ("keys.npy", "vals.npy"):
        a, b = np.load(os.path.join(text, name)), np.load(os.path.join(catalog, name))
        assert a.shape == b.shape and a.tobytes() == b.tobytes()
    # the token ids the two builds encoded are the same array
    from knnlm_jax import runs
    from knnlm_jax.data import corpus
    from knnlm_jax.data import token_cache

    vocab = runs.load_vocab(workdir)
    ids_text = token_cache.load_tokens(str(tmp_path / "t1"), corpus.read_split(corpus_dir, "train"), vocab)
    ids_tfds = token_cache.load_tokens(str(tmp_path / "t2"), corpus.read_split(spec, "train", tfds_data_dir=str(
        tmp_path / "tfds")), vocab)
    np.testing.assert_array_equal(ids_text, ids_tfds)
    # --check finds the catalog corpus again through the options recorded in the manifest
    out = build_py("--workdir", workdir, "--check", "catalog", "--sample", "4", cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_unprepared_wiki3b_and_bad_specs_are_one_line_each(tmp_path):
    import subprocess
    import sys

    corpus_dir = write_corpus(tmp_path / "corpus", n_train=20)
    workdir = str(tmp_path / "runs" / "tiny")
    make_run(corpus_dir, workdir)
    empty = str(tmp_path / "no-tfds")
    os.makedirs(empty)
    cases = [
        (("--datastore", "wiki3b", "--tfds-data-dir", empty), ("python -m knnlm_jax.cli.prepare wiki3b", empty)),
        (("--datastore", "x", "--corpus", "tfds:"), ("tfds:NAME",)),
        (("--datastore", "x", "--corpus", "tfds:a:b:c"), ("tfds:NAME",)),
        (("--datastore", "x", "--corpus", "tfds:nothing_here", "--tfds-data-dir", empty), ("nothing_here",)),
    ]
    for args, needles in cases:
        out = build_py("--workdir", workdir, *args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        for needle in needles:
            assert needle in out.stderr, (needle, out.stderr)
        assert not os.path.exists(os.path.join(workdir, "datastores", args[1], "manifest.json"))
    spec = write_tfds_wikitext(corpus_dir, str(tmp_path / "tfds"))
    out = build_py("--workdir", workdir, "--datastore", "y", "--corpus", spec, "--tfds-data-dir",
                   str(tmp_path / "tfds"), "--text-feature", "body", cwd=tmp_path)
    assert out.returncode == 2 and "body" in out.stderr and "text" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--workdir", workdir, "--datastore",
                          "wiki3b"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "python build.py --workdir" in out.stderr and "python -m knnlm_jax.cli.prepare wiki3b" in out.stderr
