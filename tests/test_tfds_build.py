"""A datastore built from a real TFDS dataset (ArrayRecord, written from local text) equals the WikiText build."""

import os

import numpy as np

from test_build_cli import build, manifest
from test_datastore import make_run, write_corpus
from tfds_fixture import write_tfds_wikitext


def test_tfds_corpus_builds_the_same_datastore_as_its_wikitext_directory(tmp_path):
    corpus_dir = write_corpus(tmp_path / "corpus", n_train=40)
    workdir = str(tmp_path / "runs" / "tiny")
    make_run(corpus_dir, workdir)
    spec = write_tfds_wikitext(corpus_dir, str(tmp_path / "tfds"))
    out = build("--workdir", workdir, "--datastore", "text", "--corpus", corpus_dir, "--no-index", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = build("--workdir", workdir, "--datastore", "catalog", "--corpus", spec, "--tfds-data-dir",
                str(tmp_path / "tfds"), "--no-index", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text, catalog = (os.path.join(workdir, "datastores", n) for n in ("text", "catalog"))
    assert manifest(catalog)["corpus"].startswith("tfds:") and manifest(catalog)["status"] == "complete"
    assert manifest(catalog)["corpus_sha256"] == manifest(text)["corpus_sha256"]
    for name in ("keys.npy", "vals.npy"):
        a, b = np.load(os.path.join(text, name)), np.load(os.path.join(catalog, name))
        assert a.shape == b.shape and a.tobytes() == b.tobytes()
    # the token ids the two builds encoded are the same array
    from knnlm_jax import corpus, runs

    vocab = runs.load_vocab(workdir)
    ids_text = corpus.load_tokens(str(tmp_path / "t1"), corpus.read_split(corpus_dir, "train"), vocab)
    ids_tfds = corpus.load_tokens(str(tmp_path / "t2"), corpus.read_split(spec, "train", tfds_data_dir=str(
        tmp_path / "tfds")), vocab)
    np.testing.assert_array_equal(ids_text, ids_tfds)
    # --check finds the catalog corpus again through the options recorded in the manifest
    out = build("--workdir", workdir, "--check", "catalog", "--sample", "4", cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
