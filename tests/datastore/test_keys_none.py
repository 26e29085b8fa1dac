"""``--keys none``: no keys on disk, the index filled during the build, resumable, checkable, searchable."""

import os

import faiss
import numpy as np
import pytest

from helpers import ROOT, write_corpus
from helpers.tiny_run import build_store, make_run
from helpers.tools import build_py
from knnlm_jax.datastore import codes
from knnlm_jax.datastore.building import check_datastore
from knnlm_jax.datastore.format import DatastoreError, open_datastore, read_manifest
from knnlm_jax.retrieval.index import make_index, read_index, search
from knnlm_jax.retrieval.searcher import index_lists

FACTORY = "IVF4,PQ4"


def neighbours(index, queries, k=16, nprobe=4):
    dists, ids = search(index, queries, k, nprobe)
    return dists, ids


def test_codes_only_build_indexes_the_same_codes_as_the_stored_keys(built, tmp_path):
    directory = tmp_path / "codes"
    m = build_store(built, directory, keys="none", index_factory=FACTORY, nprobe=2)
    assert m["status"] == "complete" and m["keys"] == "none" and m["index"]["ntotal"] == built.store.size
    assert not os.path.exists(directory / "keys.npy") and os.path.isfile(directory / "index.faiss")
    store = open_datastore(str(directory), built.signature)
    assert store.keys is None
    np.testing.assert_array_equal(np.asarray(store.vals), np.asarray(built.store.vals))
    # the same trained index filled from the fp16 keys holds the same codes: same neighbours, same distances
    index = read_index(str(directory / "index.faiss"))
    assert index_lists(index) == 4 and faiss.extract_index_ivf(index).nprobe == 2  # as built with nprobe 2
    reference = read_index(str(directory / "trained.faiss"))
    reference.add(np.asarray(built.store.keys, np.float32))
    queries = np.asarray(built.store.keys[::7][:60], np.float32)
    d0, i0 = neighbours(reference, queries)
    d1, i1 = neighbours(index, queries)
    np.testing.assert_array_equal(d0, d1)
    np.testing.assert_array_equal(np.sort(i0, axis=1), np.sort(i1, axis=1))
    report = check_datastore(store, built.trained, built.tokens, built.vocab.eos, sample=16)
    assert report["entries_checked"] >= 2 and report["max_key_difference"] < 4e-3


def test_a_killed_codes_only_build_resumes_to_the_same_index(built, tmp_path, monkeypatch):
    monkeypatch.setattr(codes, "SNAPSHOT_SECONDS", 0.0)  # snapshot after every chunk
    whole = tmp_path / "whole"
    build_store(built, whole, keys="none", index_factory=FACTORY, nprobe=4)
    killed = tmp_path / "killed"

    class Killed(Exception):
        pass

    def die(progress):
        if progress > built.store.size // 2:
            raise Killed

    with pytest.raises(Killed):
        build_store(built, killed, keys="none", index_factory=FACTORY, nprobe=4, on_chunk=die)
    m = read_manifest(str(killed))
    assert m["status"] == "building" and 0 < m["progress"] < built.store.size
    assert codes.segment_paths(str(killed))[-1][1] == m["progress"]  # saved codes end where progress does
    messages = []
    build_store(built, killed, keys="none", index_factory=FACTORY, nprobe=4, log=messages.append)
    assert any("resuming" in msg for msg in messages)
    a, b = read_index(str(whole / "index.faiss")), read_index(str(killed / "index.faiss"))
    assert a.ntotal == b.ntotal == built.store.size
    queries = np.asarray(built.store.keys[::5][:80], np.float32)
    for x, y in zip(neighbours(a, queries), neighbours(b, queries)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(np.load(whole / "vals.npy"), np.load(killed / "vals.npy"))
    assert not any(name.startswith("codes-") for name in os.listdir(killed))
    for name in ("index.faiss", "index.ivfdata"):  # the lists' layout depends on nothing but the codes
        assert (whole / name).read_bytes() == (killed / name).read_bytes()
    with np.load(whole / codes.SAMPLED) as f, np.load(killed / codes.SAMPLED) as g:
        np.testing.assert_array_equal(f["ids"], g["ids"])
        np.testing.assert_array_equal(f["keys"], g["keys"])


def test_bounded_codes_memory_writes_the_same_index_from_many_segments(built, tmp_path):
    """A few hundred entries per segment and lists assembled a few at a time: the same two files."""
    whole, small = tmp_path / "whole", tmp_path / "small"
    build_store(built, whole, keys="none", index_factory=FACTORY, nprobe=4)
    segments = []
    m = build_store(built, small, keys="none", index_factory=FACTORY, nprobe=4, memory_mib=0.01,
                    on_chunk=lambda progress: segments.append(len(codes.segment_paths(str(small)))))
    assert max(segments) >= 4 and m["index"]["segments"] >= 4 and m["index"]["ntotal"] == built.store.size
    for name in ("index.faiss", "index.ivfdata"):
        assert (whole / name).read_bytes() == (small / name).read_bytes()
    assert not any(name.startswith("codes-") for name in os.listdir(small))


def test_a_segment_past_progress_is_dropped_and_a_missing_one_refused(built, tmp_path):
    import shutil

    def interrupted(directory):
        def stop(progress):
            if len(codes.segment_paths(str(directory))) >= 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            build_store(built, directory, keys="none", index_factory=FACTORY, nprobe=4, memory_mib=0.01,
                        on_chunk=stop)
        return read_manifest(str(directory))["progress"]

    whole, ahead, gap = tmp_path / "whole", tmp_path / "ahead", tmp_path / "gap"
    build_store(built, whole, keys="none", index_factory=FACTORY, nprobe=4)
    progress = interrupted(ahead)
    # killed after a segment was written, before progress advanced: that segment is not trusted
    shutil.copy(codes.segment_paths(str(ahead))[-1][2], ahead / f"codes-{progress}-{progress + 100}.seg")
    build_store(built, ahead, keys="none", index_factory=FACTORY, nprobe=4, memory_mib=0.01)
    for name in ("index.faiss", "index.ivfdata"):
        assert (whole / name).read_bytes() == (ahead / name).read_bytes()
    interrupted(gap)
    os.remove(codes.segment_paths(str(gap))[1][2])  # a lost segment: its codes cannot be recovered
    with pytest.raises(DatastoreError, match="--overwrite"):
        build_store(built, gap, keys="none", index_factory=FACTORY, nprobe=4, memory_mib=0.01)
    overlap = tmp_path / "overlap"
    interrupted(overlap)
    (first, _, path), (_, end, _) = codes.segment_paths(str(overlap))[:2]
    shutil.copy(path, overlap / f"codes-{first}-{end}.seg")  # a stray segment over two others: refused, not merged
    with pytest.raises(DatastoreError, match="--overwrite"):
        build_store(built, overlap, keys="none", index_factory=FACTORY, nprobe=4, memory_mib=0.01)


def test_train_keys_sets_the_training_sample(built, tmp_path):
    logs = {}
    for name, train_keys in (("default", None), ("small", 300)):
        messages = []
        build_store(built, tmp_path / name, keys="none", index_factory=FACTORY, nprobe=4, train_keys=train_keys,
                    log=messages.append)
        logs[name] = next(int(m.split()[1]) for m in messages if m.startswith("sampled "))
    per_batch = built.store.size / logs["default"]  # the default samples every batch of this small store
    assert logs["small"] == pytest.approx(300 / per_batch, abs=1) and logs["small"] < logs["default"]


def test_a_codes_only_build_refuses_a_resume_as_a_keyed_build(built, tmp_path):
    directory = tmp_path / "mixed"

    def stop(progress):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_store(built, directory, keys="none", index_factory="Flat", on_chunk=stop)
    with pytest.raises(DatastoreError, match="keys"):
        build_store(built, directory)


def test_flat_codes_need_no_training(built, tmp_path):
    m = build_store(built, tmp_path / "flat", keys="none", index_factory="Flat")
    index = read_index(str(tmp_path / "flat" / "index.faiss"))
    assert m["index"]["factory"] == "Flat" and index.ntotal == built.store.size
    np.testing.assert_allclose(index.reconstruct_n(0, 5), np.asarray(built.store.keys[:5], np.float32))
    assert make_index("Flat", 16).is_trained


def test_cli_keys_none_evaluates_approximately_and_refuses_exact(tmp_path):
    import subprocess
    import sys

    workdir = str(tmp_path / "runs" / "tiny")
    make_run(write_corpus(tmp_path / "corpus", n_train=40), workdir)
    out = build_py("--workdir", workdir, "--datastore", "codes", "--keys", "none", "--index", FACTORY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "codes only" in out.stdout
    out = build_py("--workdir", workdir, "--check", "codes", "--sample", "8", cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    stray = os.path.join(workdir, "datastores", "codes", "codes-0-8.seg")  # as a build stopped just after recording
    open(stray, "wb").close()
    out = build_py("--workdir", workdir, "--datastore", "codes", "--keys", "none", "--index", FACTORY, cwd=tmp_path)
    assert out.returncode == 0 and "nothing to do" in out.stdout and not os.path.exists(stray), out.stderr
    out = build_py("--workdir", workdir, "--datastore", "codes", "--index-only", cwd=tmp_path)
    assert out.returncode == 2 and "--keys none" in out.stderr and len(out.stderr.strip().splitlines()) == 1

    def evaluate(*args):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--no-progress", "--workdir",
                               workdir, "--datastore", "codes", "--lmbda", "0.3", "--temperature", "2", "--k", "8",
                               *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    out = evaluate("--exact")
    assert out.returncode == 2 and "--approximate" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = evaluate()
    assert out.returncode == 0, out.stderr
    assert "+kNN-LM" in out.stdout


def test_the_check_sample_holds_copies_not_the_chunks_it_came_from():
    """A kept key that viewed its chunk would keep every sampled chunk alive: memory growing with N."""
    import gc
    import weakref

    sample = codes._Sample(first_id=0)
    chunk = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float16)
    alive = weakref.ref(chunk)
    sample.keep(chunk, 0, 1000)
    first = int(np.sort(np.random.default_rng([0, 1000]).choice(1000, size=256, replace=False))[0])
    np.testing.assert_array_equal(sample.keys[0], chunk[first])
    del chunk
    gc.collect()
    assert alive() is None and len(sample.keys) == 256
