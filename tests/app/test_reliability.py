"""Nothing lost, nothing silently wrong: one writer at a time, results kept until replaced, content
checked on open, a stale vocabulary never reused, every reader checks the model's weights."""

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, tiny_config, write_corpus
from helpers.tiny_run import make_run
from helpers.tools import assert_user_error, tool

ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def wait_for(predicate, timeout=120.0, what="the condition"):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def manifest_status(directory):
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            return json.load(f).get("status")
    except (OSError, ValueError):
        return None


def tree_hashes(directory, skip=(), skip_files=()):
    """sha256 of every file under ``directory`` (relative path -> digest), leaving out folders in ``skip``."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in set(files) - set(skip_files):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def project(ev):
    """The shared tiny project (conftest's ``ev``)."""
    return ev


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("locks")
    workdir = str(root / "run")
    make_run(write_corpus(root / "corpus", n_train=400), workdir)
    return root, workdir


def test_a_second_build_is_refused_while_the_first_writes_and_readers_say_so(run_dir):
    """Two real build.py processes on one datastore: the second is refused naming the first's PID and
    host; a reader says a build is running; after kill -9 the lock is gone and the printed hint resumes."""
    from knnlm_jax.core import locks

    root, workdir = run_dir
    directory = os.path.join(workdir, "datastores", "train")
    first = tool("build", "--workdir", workdir, "--no-index", cwd=root, wait=False)
    try:
        wait_for(lambda: manifest_status(directory) == "building" or first.poll() is not None, what="the build")
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-build, holding its lock
        assert manifest_status(directory) == "building", first.communicate()
        second = tool("build", "--workdir", workdir, "--no-index", cwd=root)
        assert_user_error(second, "datastore train is being written by", f"PID {first.pid}",
                          f"host {socket.gethostname()}")
        reader = tool("evaluate", "--workdir", workdir, "--datastore", "train", cwd=root)
        assert_user_error(reader, "unfinished", f"being built now by PID {first.pid}")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert locks.holder(locks.lock_path(directory)) is None  # the kernel released it
    reader = tool("evaluate", "--workdir", workdir, "--datastore", "train", cwd=root)
    assert_user_error(reader, "no build is running: resume it with python build.py")
    hint = reader.stderr.split("resume it with ", 1)[1].strip()
    argv = shlex.split(hint)
    resumed = subprocess.run([sys.executable, *argv[1:], "--no-progress"], capture_output=True, text=True, env=ENV,
                             cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert manifest_status(directory) == "complete"


def test_a_second_writer_of_a_run_directory_or_an_evaluation_is_refused(tmp_path):
    from knnlm_jax.core import locks

    workdir = str(tmp_path / "run")
    with locks.exclusive(locks.lock_path(workdir), f"run directory {workdir}"):
        out = tool("train", "--config", "tiny", "--workdir", workdir, "--set", "max_steps=1")
        assert_user_error(out, f"run directory {workdir} is being written by PID {os.getpid()}")
    assert not os.path.exists(workdir)  # refused before anything was written
    store = os.path.join(workdir, "datastores", "train")
    os.makedirs(store)
    with locks.exclusive(locks.lock_path(store), "datastore train"):  # a build running in the run directory
        out = tool("train", "--config", "tiny", "--workdir", workdir, "--set", "max_steps=1", "--overwrite")
        assert_user_error(out, f"--overwrite would delete {store}, which is being written by PID {os.getpid()}")
    assert os.path.isdir(store)


def _evaluate_args(project, out):
    return ["--workdir", project.workdir, "--datastore", "train", "--split", "test", "--k", "8", "--out", out]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_evaluation_leaves_the_last_complete_one_as_it_was(project, tmp_path, sig):
    out = str(tmp_path / "eval" / "train")  # as <run>/eval/<datastore>, where generate.py reads lambda and T
    done = tool("evaluate", *_evaluate_args(project, out), cwd=project.root)
    assert done.returncode == 0, done.stderr
    before = tree_hashes(out)
    assert {"results.json", "sweep_k.json", "logprobs-test.npz"} <= set(before)
    again = tool("evaluate", *_evaluate_args(project, out), "--recompute", "--lmbda", "0.5", cwd=project.root,
                 wait=False)
    try:
        wait_for(lambda: os.path.isdir(os.path.join(out, ".next")) or again.poll() is not None, what="staging")
        os.kill(again.pid, sig)
        _, err = again.communicate(timeout=60)
    finally:
        if again.poll() is None:
            again.kill()
    if sig == signal.SIGINT:
        assert again.returncode == 130 and err.strip().endswith("evaluate.py: interrupted"), err
        assert not os.path.exists(os.path.join(out, ".next"))
    else:
        assert again.returncode == -signal.SIGKILL
    assert tree_hashes(out, skip=(".next",)) == before  # every earlier file, byte for byte
    from knnlm_jax.evaluation.outputs import tuned

    with open(os.path.join(out, "results.json")) as f:
        knn = json.load(f)["knn"]
    assert tuned(out) == {"lmbda": knn["lmbda"], "temperature": knn["temperature"]}
    redo = tool("evaluate", *_evaluate_args(project, out), "--lmbda", "0.5", cwd=project.root)
    assert redo.returncode == 0, redo.stderr
    assert not os.path.exists(os.path.join(out, ".next"))
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["knn"]["lmbda"] == 0.5


def test_a_failed_evaluation_keeps_the_earlier_results(project, tmp_path):
    out = str(tmp_path / "eval")
    assert tool("evaluate", *_evaluate_args(project, out), cwd=project.root).returncode == 0
    before = tree_hashes(out)
    failed = tool("evaluate", "--workdir", project.workdir, "--datastore", "train", "--out", out,
                  "--retrieve-fraction", "0.5", cwd=project.root)  # refused inside the evaluation
    assert_user_error(failed, "adaptive retrieval")
    assert tree_hashes(out) == before


def test_an_interrupted_commit_is_rolled_forward_and_read_meanwhile(tmp_path):
    from knnlm_jax.evaluation import outputs as eval_outputs

    out = tmp_path / "eval"
    with eval_outputs.staging(str(out)) as stage:
        for name, text in (("results.json", "old"), ("sweep_k.json", "old"), ("logprobs-valid.npz", "old")):
            with open(stage.path(name), "w") as f:
                f.write(text)
        stage.commit()
    assert sorted(os.listdir(out)) == ["logprobs-valid.npz", "results.json", "sweep_k.json"]
    with eval_outputs.staging(str(out)) as stage:
        for name in ("results.json", "logprobs-test.npz"):
            with open(stage.path(name), "w") as f:
                f.write("new")
        os.makedirs(stage.path("tokens-test"))
        names = ["logprobs-test.npz", "tokens-test", "results.json"]
        with open(stage.path(eval_outputs.COMMIT), "w") as f:
            json.dump(names, f)  # as if killed right after the commit list was written
        os.replace(stage.path("logprobs-test.npz"), out / "logprobs-test.npz")  # ... and one move done
        assert open(eval_outputs.results_path(str(out))).read() == "new"  # readers see the committed one
    # the writer died there: the next reader finishes the move (under the writer's lock) before reading
    assert eval_outputs.results_path(str(out)) == str(out / "results.json")
    assert sorted(os.listdir(out)) == ["logprobs-test.npz", "results.json", "tokens-test"]
    assert (out / "results.json").read_text() == "new"


def test_damaged_keys_are_caught_when_a_reader_opens_the_datastore(project, tmp_path):
    """Half of keys.npy overwritten in place (same size): evaluate refuses in one line, naming keys.npy."""
    directory = os.path.join(project.workdir, "datastores", "damaged")
    shutil.copytree(os.path.join(project.workdir, "datastores", "train"), directory)
    try:
        keys = np.load(os.path.join(directory, "keys.npy"), mmap_mode="r+")
        half = len(keys) // 2
        keys[half:] = np.random.default_rng(0).standard_normal(keys[half:].shape).astype(np.float16)
        keys.flush()
        del keys
        out = tool("evaluate", "--workdir", project.workdir, "--datastore", "damaged", "--k", "8", "--out",
                   str(tmp_path / "eval"), cwd=project.root)
        assert_user_error(out, "datastore damaged: keys.npy entries", "do not match the sha256 recorded at build time")
        assert not os.path.exists(tmp_path / "eval" / "results.json")
    finally:
        shutil.rmtree(directory)


def test_the_sampled_check_finds_one_damaged_block_of_many(tmp_path):
    from knnlm_jax.datastore.content_hash import HASH_BLOCK, LINKS, sample_content, verify_content
    from knnlm_jax.datastore.format import DatastoreError, open_datastore
    from knnlm_jax.datastore.writer import DatastoreWriter

    n, d = 3 * HASH_BLOCK + 5, 2
    header = dict(model_fingerprint="m", key_type="k", dim=d, vocab_fingerprint="v", vocab_size=9, corpus="c",
                  corpus_sha256="s", split="train", text_encoding=None, num_entries=n, window=4, context=2,
                  batch_size=1)
    directory = str(tmp_path / "store")
    writer = DatastoreWriter(directory, header)
    rng = np.random.default_rng(0)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        writer.append(rng.standard_normal((m, d)).astype(np.float16), rng.integers(0, 9, m).astype(np.int32))
    writer.finish()
    assert os.path.getsize(os.path.join(directory, LINKS)) == 4 * 130
    store = open_datastore(directory)
    assert "checked 4 of 4 blocks" in sample_content(store) and verify_content(store)
    vals = np.load(os.path.join(directory, "vals.npy"), mmap_mode="r+")
    vals[HASH_BLOCK + 7] += 1  # one value in block 1
    vals.flush()
    del vals
    with pytest.raises(DatastoreError, match=f"vals.npy entries {HASH_BLOCK}..{2 * HASH_BLOCK - 1} do not match"):
        sample_content(open_datastore(directory))
    with open(os.path.join(directory, LINKS), "r+b") as f:  # the last link changed: refused, never skipped
        f.seek(3 * 130)
        f.write(b"0" * 8)
    with pytest.raises(DatastoreError, match="content.links does not match"):
        sample_content(open_datastore(directory))
    os.remove(os.path.join(directory, LINKS))
    with pytest.raises(DatastoreError, match="content.links is missing or damaged"):
        sample_content(open_datastore(directory))


def test_an_unfinished_sharded_datastore_says_to_relaunch_its_processes(tmp_path):
    from knnlm_jax.datastore.format import DatastoreError, open_datastore

    directory = tmp_path / "datastores" / "wiki"
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps(dict(format_version=1, layout="sharded", num_shards=2,
                                                             status="building")))
    with pytest.raises(DatastoreError, match="no build is running: relaunch its 2 processes to resume it"):
        open_datastore(str(directory))


def test_a_vocabulary_left_by_a_failed_first_run_is_rebuilt_for_another_corpus(tmp_path, capsys):
    from knnlm_jax.training.run_data import prepare_data
    from knnlm_jax.data.vocab import Vocab

    first = write_corpus(tmp_path / "first", n_train=30)
    os.remove(os.path.join(first, "valid.txt"))  # the first run fails after making its vocabulary
    second = str(tmp_path / "second")
    os.makedirs(second)
    for split in ("train", "valid", "test"):
        with open(os.path.join(second, f"{split}.txt"), "w") as f:
            f.write("\n".join(f"other words {split} {i} here" for i in range(50)) + "\n")
    workdir = str(tmp_path / "run")
    with pytest.raises(Exception):
        prepare_data(tiny_config(first), workdir)
    assert os.path.isfile(os.path.join(workdir, "vocab.txt"))  # left behind: must not be reused for another corpus
    data = prepare_data(tiny_config(second), workdir)
    fresh = prepare_data(tiny_config(second), str(tmp_path / "fresh"))
    assert data.vocab == fresh.vocab and "rebuilding it from" in capsys.readouterr().err
    np.testing.assert_array_equal(data.train_ids, fresh.train_ids)
    again = prepare_data(tiny_config(second), workdir)  # its own vocabulary: kept, silently
    assert again.vocab == fresh.vocab and "rebuilding" not in capsys.readouterr().err
    assert Vocab.load(os.path.join(workdir, "vocab.txt")) == fresh.vocab
    # killed between the two writes of another corpus's vocabulary: no record vouches for it
    first_vocab = prepare_data(tiny_config(write_corpus(tmp_path / "third", n_train=30)), str(tmp_path / "v3")).vocab
    first_vocab.save(os.path.join(workdir, "vocab.txt"))
    assert prepare_data(tiny_config(second), workdir).vocab == fresh.vocab
    assert "rebuilding it from" in capsys.readouterr().err


def test_generate_refuses_a_datastore_built_with_other_weights(project, tmp_path, capsys):
    import jax

    from knnlm_jax.core.checkpoint import Checkpointer
    from generate import main

    workdir = str(tmp_path / "run")
    shutil.copytree(project.workdir, workdir, ignore=shutil.ignore_patterns("eval"))
    params = jax.tree_util.tree_map(lambda x: x * 1.01, jax.device_get(project.trained.params))
    ckpt = Checkpointer(os.path.join(workdir, "best"))
    ckpt.save(4, {"params": params}, {"best_valid_ppl": 98.0, "best_step": 4})  # a retrained model
    ckpt.close()
    with pytest.raises(SystemExit) as exit_info:
        main(["--workdir", workdir, "--datastore", "train", "--prompt", "the", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "built with other model weights" in err


def test_device_search_with_approximate_distances_is_refused(project, tmp_path):
    out = tool("evaluate", "--workdir", project.workdir, "--datastore", "train", "--search", "device",
               "--approximate", "--out", str(tmp_path / "eval"), cwd=project.root)
    assert_user_error(out, "--search device computes exact distances", "--approximate does not apply")


def test_a_full_disk_while_faiss_writes_the_index_is_one_line(project, tmp_path):
    """A real tmpfs with room for the datastore but not its Flat index (float32: twice the fp16 keys)."""
    source = os.path.join(project.workdir, "datastores", "train")
    files = [f for f in ("keys.npy", "vals.npy", "content.links") if os.path.exists(os.path.join(source, f))]
    need = sum(os.path.getsize(os.path.join(source, f)) for f in files + ["manifest.json"])
    mnt = tmp_path / "small"
    mnt.mkdir()
    for name in ("best", "config.json", "vocab.txt"):
        need += sum(os.path.getsize(os.path.join(r, f)) + 4096 for r, _, fs in os.walk(os.path.join(project.workdir, name))
                    for f in fs) if name == "best" else os.path.getsize(os.path.join(project.workdir, name)) + 4096
    size = need + 3 * 4096  # the lock file and a little: not the index (twice the keys)
    assert 2 * os.path.getsize(os.path.join(source, "keys.npy")) > 4 * 4096
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (no mount rights)")
    try:
        workdir = mnt / "run"
        workdir.mkdir()
        for name in ("config.json", "vocab.txt"):
            shutil.copy(os.path.join(project.workdir, name), workdir / name)
        shutil.copytree(os.path.join(project.workdir, "best"), workdir / "best")
        directory = workdir / "datastores" / "train"
        directory.mkdir(parents=True)
        for name in files:
            shutil.copy(os.path.join(source, name), directory / name)
        with open(os.path.join(source, "manifest.json")) as f:
            m = dict(json.load(f), index=None)  # as a build with --no-index leaves it
        (directory / "manifest.json").write_text(json.dumps(m))
        before = tree_hashes(str(directory), skip_files=("manifest.json",))
        out = tool("build", "--workdir", str(workdir), "--datastore", "train", "--index-only", "--index", "Flat",
                   cwd=project.root)
        assert_user_error(out, "No space left on device", "run the same command again")
        assert tree_hashes(str(directory), skip_files=("manifest.json",)) == before  # nothing half-written
        with open(directory / "manifest.json") as f:
            after = json.load(f)
        assert {k: v for k, v in after.items() if k != "updated"} == {k: v for k, v in m.items() if k != "updated"}
        assert sorted(os.listdir(directory)) == sorted(files + ["manifest.json"])
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
