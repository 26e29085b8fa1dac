"""Several processes on localhost (jax.distributed, gloo CPU collectives): sharded builds, indexes and searches.

Every launch here is real: P copies of build.py / evaluate.py connected through a coordinator
on 127.0.0.1. A 2-process build must equal the 1-process build byte for byte (concatenated
shards), and the merged on-disk index, the shards searched by 2 processes and the
monolithic index must give the same neighbours and the same perplexity.
"""

import json
import os
import socket
import subprocess
import sys

import faiss
import numpy as np
import pytest

from helpers import ROOT, write_corpus
from helpers.tiny_run import make_run
from helpers.tools import manifest
from knnlm_jax.retrieval.index_shards import same_neighbours

pytestmark = pytest.mark.slow(4)

INDEX = "IVF4,PQ4"  # d_model 16: 4 lists, 4-byte codes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def launch(script: str, args, processes: int, cwd, timeout=300):
    """Run ``script`` as ``processes`` processes on localhost; ``[(returncode, stdout, stderr)]`` in process order."""
    cmd = [sys.executable, os.path.join(ROOT, script), "--no-progress", *args]
    if processes == 1:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=cwd, timeout=timeout)
        return [(out.returncode, out.stdout, out.stderr)]
    port = free_port()
    procs = [subprocess.Popen(cmd + ["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(processes),
                                     "--process_id", str(p)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env(), cwd=cwd) for p in range(processes)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, out, err))
    return results


def ok(results):
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    return results


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny run with a 1-process datastore ``mono`` and a 2-process datastore ``duo`` of the same corpus."""
    root = tmp_path_factory.mktemp("mp")
    workdir = str(root / "runs" / "tiny")
    make_run(write_corpus(root / "corpus", n_train=80), workdir)
    ok(launch("build.py", ["--workdir", workdir, "--datastore", "mono", "--index", INDEX], 1, root))
    ok(launch("build.py", ["--workdir", workdir, "--datastore", "duo", "--index", INDEX], 2, root))
    return root, workdir


def test_two_process_build_is_byte_identical_to_one_process(project):
    _, workdir = project
    mono, duo = (os.path.join(workdir, "datastores", n) for n in ("mono", "duo"))
    m = manifest(duo)
    assert m["layout"] == "sharded" and m["num_shards"] == 2 and m["status"] == "complete"
    (lo0, hi0), (lo1, hi1) = m["shard_entries"]
    assert lo0 == 0 and hi0 == lo1 and hi1 == m["num_entries"] == manifest(mono)["num_entries"]
    for name in ("keys.npy", "vals.npy"):
        whole = np.load(os.path.join(mono, name))
        parts = [np.load(os.path.join(duo, f"shard-{p:05d}-of-00002", name)) for p in range(2)]
        assert len(parts[0]) > 0 and len(parts[1]) > 0
        assert np.concatenate(parts).tobytes() == whole.tobytes()
    assert abs(m["lm_nll_sum"] - manifest(mono)["lm_nll_sum"]) < 1e-3 * abs(m["lm_nll_sum"])


def test_merged_sharded_and_monolithic_indexes_agree(project):
    """Same trained index: merged on disk, shards merged by FAISS, and one index with every key give one answer.

    Ties: results are compared as (distance, id) pairs sorted by distance then id, after
    dropping the pairs at each query's k-th distance (which of several equal-distance
    entries makes the cut is not defined by FAISS).
    """
    from knnlm_jax.datastore.format import open_datastore
    from knnlm_jax.retrieval.index import read_index, search
    from knnlm_jax.retrieval.index_shards import merge_results

    _, workdir = project
    store = open_datastore(os.path.join(workdir, "datastores", "duo"))
    trained = read_index(os.path.join(store.directory, "trained.faiss"))
    mono = faiss.clone_index(trained)
    mono.add(np.asarray(store.keys[:], np.float32))
    merged = read_index(os.path.join(store.directory, "index.faiss"), mmap=True)
    shards = [read_index(os.path.join(s.directory, "index.faiss")) for s in store.shards]
    queries = np.random.default_rng(0).normal(size=(200, store.dim)).astype(np.float32) * 3
    queries[:100] = np.asarray(store.keys[np.arange(0, store.size, max(1, store.size // 100))[:100]], np.float32)
    k, nprobe = 32, 2
    reference = search(mono, queries, k, nprobe)
    answers = [search(merged, queries, k, nprobe),
               merge_results(*zip(*(search(ix, queries, k, nprobe) for ix in shards)), k)]
    for dists, ids in answers:
        for q in range(len(queries)):
            assert same_neighbours(reference[0][q], reference[1][q], dists[q], ids[q])


def evaluation(root, workdir, name, processes, *extra):
    out = os.path.join(root, f"eval-{name}-{processes}-{'-'.join(extra) or 'auto'}")
    args = ["--workdir", workdir, "--datastore", name, "--lmbda", "0.3", "--temperature", "2", "--k", "16",
            "--nprobe", "2", "--approximate", "--out", out, *extra]
    results = ok(launch("evaluate.py", args, processes, root))
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), results


def test_perplexity_agrees_across_merged_sharded_and_monolithic_search(project):
    root, workdir = project
    merged, _ = evaluation(root, workdir, "duo", 1, "--search", "merged")
    local_shards, _ = evaluation(root, workdir, "duo", 1, "--search", "shards")
    two, results = evaluation(root, workdir, "duo", 2)
    assert "served" in results[1][2]
    ppl = [r["table"][1]["ppl"] if "table" in r else r["rows"][1]["ppl"] for r in (merged, local_shards, two)]
    assert ppl[0] > 0
    np.testing.assert_allclose(ppl, ppl[0], rtol=1e-6)


def test_check_runs_under_two_processes(project):
    root, workdir = project
    results = ok(launch("build.py", ["--workdir", workdir, "--check", "duo", "--sample", "8"], 2, root))
    assert "ok" in results[0][1] and "2 processes" in results[0][1]


def test_a_process_count_other_than_the_builds_is_refused(project):
    root, workdir = project
    args = ["--workdir", workdir, "--datastore", "duo", "--lmbda", "0.3", "--temperature", "2"]
    results = launch("evaluate.py", args, 3, root, timeout=120)
    assert results[0][0] == 2 and "3" in results[0][2] and "2 shards" in results[0][2]
    assert len(results[0][2].strip().splitlines()) == 1


def test_a_missing_shard_is_named(project, tmp_path):
    import shutil

    root, workdir = project
    broken = os.path.join(workdir, "datastores", "broken")
    shutil.copytree(os.path.join(workdir, "datastores", "duo"), broken)
    shutil.rmtree(os.path.join(broken, "shard-00001-of-00002"))
    rc, _, err = launch("evaluate.py", ["--workdir", workdir, "--datastore", "broken", "--lmbda", "0.3",
                                        "--temperature", "2"], 1, root)[0]
    assert rc == 2 and "shard-00001-of-00002 is missing" in err and len(err.strip().splitlines()) == 1


def test_two_process_codes_only_build_merges_the_same_index(project):
    """``--keys none`` under 2 processes: sample shared, trained once, shards' codes merged on disk."""
    from knnlm_jax.datastore.format import open_datastore
    from knnlm_jax.retrieval.index import read_index, search

    root, workdir = project
    ok(launch("build.py", ["--workdir", workdir, "--datastore", "codes1", "--keys", "none", "--index", INDEX], 1,
              root))
    ok(launch("build.py", ["--workdir", workdir, "--datastore", "codes2", "--keys", "none", "--index", INDEX], 2,
              root))
    one, two = (os.path.join(workdir, "datastores", n) for n in ("codes1", "codes2"))
    m = manifest(two)
    assert m["status"] == "complete" and m["index"]["merged"] and m["index"]["keys"] == "none"
    assert not any(os.path.exists(os.path.join(two, f"shard-{p:05d}-of-00002", "keys.npy")) for p in range(2))
    store = open_datastore(two)
    np.testing.assert_array_equal(np.asarray(store.vals), np.load(os.path.join(one, "vals.npy")))
    a, b = read_index(os.path.join(one, "index.faiss")), read_index(os.path.join(two, "index.faiss"))
    assert a.ntotal == b.ntotal == store.size
    queries = np.asarray(open_datastore(os.path.join(workdir, "datastores", "mono")).keys[::9][:100], np.float32)
    for (d0, i0), (d1, i1) in [(search(a, queries, 16, 4), search(b, queries, 16, 4))]:
        np.testing.assert_array_equal(d0, d1)
        for q in range(len(queries)):
            assert same_neighbours(d0[q], i0[q], d1[q], i1[q])
    results = ok(launch("build.py", ["--workdir", workdir, "--check", "codes2", "--sample", "8"], 2, root))
    assert "ok" in results[0][1]
    # the codes are stored once: no shard index, no segment left; each process searches its id range
    # of the one index, which gives what the one index gives
    leftovers = [name for p in range(2) for name in os.listdir(os.path.join(two, f"shard-{p:05d}-of-00002"))
                 if name.startswith(("index.", "codes-"))]
    assert not leftovers and m["index"]["ivfdata_bytes"] == os.path.getsize(os.path.join(two, "index.ivfdata"))
    whole, _ = evaluation(root, workdir, "codes1", 1)
    ranged, _ = evaluation(root, workdir, "codes2", 2)
    local, _ = evaluation(root, workdir, "codes2", 1, "--search", "shards")
    ppl = [r["table"][1]["ppl"] if "table" in r else r["rows"][1]["ppl"] for r in (whole, ranged, local)]
    assert ppl[0] > 0
    np.testing.assert_allclose(ppl, ppl[0], rtol=1e-6)


def test_resuming_with_another_process_count_is_refused(project):
    import shutil

    from knnlm_jax.datastore.format import update_manifest

    root, workdir = project
    half = os.path.join(workdir, "datastores", "half")
    shutil.copytree(os.path.join(workdir, "datastores", "duo"), half)
    update_manifest(half, status="building")  # as a killed 2-process build leaves it
    rc, _, err = launch("build.py", ["--workdir", workdir, "--datastore", "half"], 1, root)[0]
    assert rc == 2 and "by 2 processes" in err and "--num_processes 2" in err, err
    assert len(err.strip().splitlines()) == 1
    assert manifest(half)["status"] == "building"  # nothing marked complete


def unfinish(shard: str) -> None:
    """A shard as its process leaves it when killed before writing anything: building, nothing hashed."""
    import json

    from knnlm_jax.datastore.content_hash import LINKS
    from knnlm_jax.datastore.format import MANIFEST

    path = os.path.join(shard, MANIFEST)
    with open(path) as f:
        m = json.load(f)
    m.update(status="building", progress=0, lm_nll_sum=0.0, index=None)
    m.pop("content", None)
    with open(path, "w") as f:
        json.dump(m, f)
    os.remove(os.path.join(shard, LINKS))


@pytest.mark.parametrize("keys", ["fp16", "none"])
def test_a_relaunch_after_a_peer_died_keeps_the_finished_shard_and_completes(project, keys):
    """As a build leaves it when process 1 dies after process 0's shard is complete: shard 0 complete, shard 1
    unfinished, the top manifest building. Relaunching the same two commands keeps shard 0 (byte for byte,
    untouched), finishes shard 1 and the top manifest: the same bytes (keys and values, or values and the
    one index of codes) as an uninterrupted build. With ``--keys none`` the state is made by a real
    failure of process 1 as it finishes its shard, shard 0's codes still in segments."""
    import shutil

    from knnlm_jax.datastore.format import update_manifest

    root, workdir = project
    name = f"died-{keys}"
    args = ["--workdir", workdir, "--datastore", name, "--index", INDEX, "--keys", keys]
    ok(launch("build.py", args, 2, root))
    done = os.path.join(workdir, "datastores", name)
    whole = {p: manifest(os.path.join(done, f"shard-{p:05d}-of-00002")) for p in range(2)}
    reference = os.path.join(str(root), f"reference-{keys}")
    shutil.move(done, reference)
    shard0, shard1 = (os.path.join(done, f"shard-{p:05d}-of-00002") for p in range(2))
    if keys == "fp16":
        shutil.copytree(reference, done)
        unfinish(shard1)
        update_manifest(done, status="building", index=None)
    else:  # a real failure of process 1 at the very end of its shard (the file it writes last is a directory)
        os.makedirs(os.path.join(shard1, "sampled_keys.npz.tmp"))
        shutil.copy(os.path.join(reference, "manifest.json"), done)  # a started build: its directory is kept
        update_manifest(done, status="building", index=None, lm_nll_sum=0.0)
        results = launch("build.py", args, 2, root)
        assert results[0][0] == 3 and results[1][0] != 0, [r[2][-2000:] for r in results]
        os.rmdir(os.path.join(shard1, "sampled_keys.npz.tmp"))
        assert manifest(shard0)["status"] == "complete" and manifest(shard1)["status"] == "building"
        assert manifest(done)["status"] == "building" and not os.path.exists(os.path.join(done, "index.faiss"))
    before = os.stat(os.path.join(shard0, "vals.npy")).st_mtime_ns
    results = ok(launch("build.py", args, 2, root))
    assert "shard 0: complete, kept" in results[0][2]
    assert os.stat(os.path.join(shard0, "vals.npy")).st_mtime_ns == before
    assert manifest(done)["status"] == "complete" and manifest(shard1)["status"] == "complete"
    files = {"fp16": [(f"shard-{p:05d}-of-00002", f) for p in range(2) for f in ("vals.npy", "keys.npy")],
             "none": [(".", "index.faiss"), (".", "index.ivfdata")]
             + [(f"shard-{p:05d}-of-00002", "vals.npy") for p in range(2)]}[keys]
    for where, file in files:
        with open(os.path.join(done, where, file), "rb") as a, open(os.path.join(reference, where, file), "rb") as b:
            assert a.read() == b.read(), (where, file)
    for p in range(2):
        assert manifest(os.path.join(done, f"shard-{p:05d}-of-00002"))["content"] == whole[p]["content"]


@pytest.mark.parametrize("victim", [1, 0], ids=["peer", "coordinator"])
def test_a_killed_process_ends_its_peer_in_seconds_with_one_line_and_a_relaunch_completes(project, victim):
    """``kill -9`` of one launched process while both work: the other exits within 30 s with status 3 and
    one line naming the stopped process (no traceback, no runtime stack trace); the same two commands
    then finish the datastore with the bytes of the 1-process build."""
    import signal
    import time

    root, workdir = project
    name = f"killed-{victim}"
    cmd = [sys.executable, os.path.join(ROOT, "build.py"), "--no-progress", "--workdir", workdir, "--datastore", name,
           "--index", INDEX, "--coordinator", f"127.0.0.1:{free_port()}", "--num_processes", "2"]
    errs = [root / f"{name}-{p}.err" for p in range(2)]
    procs = [subprocess.Popen(cmd + ["--process_id", str(p)], stdout=subprocess.DEVNULL, stderr=open(errs[p], "w"),
                              env=env(), cwd=root) for p in range(2)]
    try:
        deadline = time.time() + 240
        while not all(f"process {p} of 2" in errs[p].read_text() for p in range(2)):
            assert time.time() < deadline and all(proc.poll() is None for proc in procs), [e.read_text() for e in errs]
            time.sleep(0.1)
        killed = time.time()
        procs[victim].send_signal(signal.SIGKILL)
        survivor = procs[1 - victim]
        assert survivor.wait(timeout=60) == 3
        assert time.time() - killed < 30
        procs[victim].wait(timeout=10)
    finally:  # nothing outlives the test (each launched process's work dies with it)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for line in errs[1 - victim].read_text().splitlines() if line.strip()]
    assert lines[-1].startswith(f"build.py: error: process {1 - victim}: process {victim} ")
    assert lines[-1].split(": ", 3)[3].startswith(("process 1 stopped", "process 0 (the coordinator) stopped"))
    assert "run the same commands again to resume" in lines[-1]
    assert lines[:-1] == [f"process {1 - victim} of 2"]  # nothing else: no traceback, no runtime log
    ok(launch("build.py", ["--workdir", workdir, "--datastore", name, "--index", INDEX], 2, root))
    done, mono = (os.path.join(workdir, "datastores", n) for n in (name, "mono"))
    for file in ("keys.npy", "vals.npy"):
        parts = [np.load(os.path.join(done, f"shard-{p:05d}-of-00002", file)) for p in range(2)]
        assert np.concatenate(parts).tobytes() == np.load(os.path.join(mono, file)).tobytes()


def test_a_process_whose_peers_never_connect_says_so_in_one_line(project, tmp_path):
    """Process 1 started alone (no coordinator listening): after --init-timeout, one line and status 3."""
    root, workdir = project
    out = subprocess.run([sys.executable, os.path.join(ROOT, "build.py"), "--no-progress", "--workdir", workdir,
                          "--datastore", "alone", "--coordinator", f"127.0.0.1:{free_port()}", "--num_processes", "2",
                          "--process_id", "1", "--init-timeout", "2"], capture_output=True, text=True, env=env(),
                         cwd=root, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 3 and len(lines) == 1, out.stderr
    assert lines[0].startswith("build.py: error: process 1: the launch's processes did not all reach the coordinator")


ENCODE = """
import sys
from knnlm_jax import runs
from knnlm_jax.core import distributed
from knnlm_jax.core.distributed import Launch
from knnlm_jax.data import token_cache
from knnlm_jax.data.corpus import read_split

workdir, corpus, port, p = sys.argv[1:5]
processes = distributed.initialize(Launch(f"127.0.0.1:{port}", 2, int(p)))
calls = []
vocab = runs.load_vocab(workdir)
encode = vocab.encode
vocab.encode = lambda lines: calls.append(len(lines)) or encode(lines)
share = token_cache.Share(processes.index, processes.count, distributed.allgather, distributed.barrier, block_lines=7)
cache = sys.argv[5]
tokens = token_cache.load_tokens(cache, read_split(corpus, "train", cache_dir=cache), vocab, share)
print("encoded", len(calls), sum(calls), len(tokens))
distributed.leave(0)
"""


def test_two_processes_encode_a_corpus_in_shares_to_the_one_process_bytes(project, tmp_path):
    """Each process encodes every other block of 7 lines; the array is the one a single process writes."""
    from knnlm_jax import runs
    from knnlm_jax.data import token_cache
    from knnlm_jax.data.corpus import read_split

    _, workdir = project
    corpus = write_corpus(tmp_path / "fresh", n_train=60)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    reference = token_cache.load_tokens(one, read_split(corpus, "train", cache_dir=one), runs.load_vocab(workdir))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", ENCODE, workdir, corpus, str(port), str(p), two],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
             for p in range(2)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outs]
    counts = [tuple(int(x) for x in line.split()[1:]) for out, _ in outs for line in out.splitlines()
              if line.startswith("encoded ")]
    with open(os.path.join(corpus, "train.txt")) as f:
        blocks = [len(b) for b in np.array_split(np.arange(sum(1 for _ in f)), range(7, 10**6, 7)) if len(b)]
    assert len(blocks) >= 4  # process 0 encodes blocks 0, 2, ...; process 1 blocks 1, 3, ...
    assert counts == [(len(blocks[p::2]), sum(blocks[p::2]), len(reference)) for p in range(2)]
    (written,) = [name for name in os.listdir(two) if name.endswith(".npy")]
    assert written == next(n for n in os.listdir(one) if n.endswith(".npy"))  # same split, text hash, vocabulary
    assert open(os.path.join(two, written), "rb").read() == open(os.path.join(one, written), "rb").read()
    assert not [name for name in os.listdir(two) if ".part" in name or name.startswith(".")]
