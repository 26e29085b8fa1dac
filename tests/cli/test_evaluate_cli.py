"""evaluate.py end to end: the table, results.json, plots and per-token files; bad input is one line on stderr."""

import json
import os
import shutil
import subprocess

import pytest

from helpers.tools import assert_user_error, tool

pytestmark = pytest.mark.slow(6)


@pytest.fixture
def project(ev):
    """The shared tiny project (conftest's ``ev``): this file adds datastores and outputs beside it."""
    return ev


def evaluate(project, *args, devices=1):
    return tool("evaluate", "--workdir", project.workdir, *args, cwd=project.root, devices=devices)


def evaluate_here(project, capsys, *args):
    """``evaluate.main`` in this process (no JAX start-up): ``(exit status, stdout, stderr)``."""
    import evaluate as cli

    try:
        status = cli.main(["--no-progress", "--workdir", project.workdir, *args])
    except SystemExit as exit:
        status = exit.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_tune_on_valid_report_on_test(project, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out = evaluate(project, "--datastore", "train", "--split", "test", "--k", "16", "--temperature", "auto",
                   "--cache", "--cache-size", "8", "--cache-theta", "0.01,0.1", "--max-tokens", "150", "--show", "2",
                   "--out", str(out_dir), devices=2)  # a 2-device mesh: the batch is sharded
    assert out.returncode == 0, out.stderr
    for line in ("base LM", "+kNN-LM ", "+cache", "+kNN-LM+cache", "tuned on valid", "neighbour 1", "context: ..."):
        assert line in out.stdout, out.stdout
    with open(out_dir / "results.json") as f:
        r = json.load(f)
    assert r["split"] == "test" and r["tokens"] == 150 and r["unit"] == "word"
    assert [row["name"] for row in r["rows"]] == ["base LM", "+kNN-LM", "+cache", "+kNN-LM+cache"]
    assert r["knn"]["lmbda_source"] == r["knn"]["temperature_source"] == "tuned on valid"
    assert r["cache"]["cache"]["theta_source"] == "tuned on valid" and r["valid"]["tokens"] == 150
    assert "evaluate.py" in r["command"] and r["config"]["key_type"] == "ffn_input_after_ln"
    assert r["datastore_manifest"]["num_entries"] == project.store.size and len(r["examples"]) == 2
    for name in ("sweep_k.json", "sweep_k.png", "sweep_lambda.json", "sweep_lambda.png", "logprobs-test.npz"):
        assert (out_dir / name).stat().st_size > 0
    one = evaluate(project, "--datastore", "train", "--split", "test", "--k", "16", "--temperature", "auto",
                   "--cache", "--cache-size", "8", "--cache-theta", "0.01,0.1", "--max-tokens", "150",
                   "--out", str(tmp_path / "one-device"), devices=1)
    assert one.returncode == 0, one.stderr
    with open(tmp_path / "one-device" / "results.json") as f:
        r1 = json.load(f)
    for a, b in zip(r["rows"], r1["rows"]):  # the batch sharded over 2 devices gives the 1-device numbers
        assert a["name"] == b["name"] and a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    assert (r["knn"]["lmbda"], r["knn"]["temperature"]) == (r1["knn"]["lmbda"], r1["knn"]["temperature"])
    skipping = evaluate(project, "--datastore", "train", "--split", "test", "--k", "16", "--max-tokens", "150",
                        "--lmbda", "0.5", "--temperature", "1", "--show", "50", "--show-skip", "<unk>,the",
                        "--out", str(tmp_path / "skip"))
    assert skipping.returncode == 0, skipping.stderr
    assert "skips the targets <unk>, the" in skipping.stdout
    with open(tmp_path / "skip" / "results.json") as f:
        shown = json.load(f)["examples"]
    assert shown and all(ex["target"] not in ("<unk>", "the") for ex in shown)
    change = r["rows"][1]["change_pct"]
    assert change == pytest.approx(100 * (r["rows"][1]["ppl"] / r["rows"][0]["ppl"] - 1))
    assert f"{change:+.1f}%" in out.stdout

    # again in this process with lambda 0: the saved per-token files are reused and the LM is reproduced
    status, stdout, stderr = evaluate_here(project, capsys, "--datastore", "train", "--split", "test", "--k", "16",
                                           "--lmbda", "0", "--temperature", "1", "--max-tokens", "150",
                                           "--out", str(out_dir))
    assert status == 0, stderr
    assert "reusing the per-token files" in stderr
    with open(out_dir / "results.json") as f:
        r0 = json.load(f)
    assert r0["rows"][1]["ppl"] == r0["rows"][0]["ppl"] == r["rows"][0]["ppl"]
    assert r0["valid"] is None  # nothing was tuned


def test_bad_input_is_one_line_on_stderr(project, tmp_path, capsys):
    assert_user_error(evaluate(project, "--datastore", "train", "--lmbda", "1.5"), "--lmbda 1.5", "[0, 1]")

    def error(*args):
        status, _, err = evaluate_here(project, capsys, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    assert "--k 0" in error("--datastore", "train", "--k", "0")
    assert "--lmbda 1.5" in error("--datastore", "train", "--lmbda", "1.5")
    assert "--temperature 'hot'" in error("--datastore", "train", "--temperature", "hot")
    assert "--tune-tokens" in error("--datastore", "train", "--split", "test", "--tune-tokens", "-5")
    assert "no datastore nope" in error("--datastore", "nope")
    assert "bad datastore name" in error("--datastore", "../x")
    no_test = tmp_path / "corpus"
    shutil.copytree(project.data_dir, no_test)
    os.remove(no_test / "test.txt")
    assert "no test split" in error("--datastore", "train", "--split", "test", "--data_dir", str(no_test))
    stores = os.path.join(project.workdir, "datastores")

    def copy(name, **fields):
        shutil.copytree(os.path.join(stores, "train"), os.path.join(stores, name), dirs_exist_ok=True)
        path = os.path.join(stores, name, "manifest.json")
        with open(path) as f:
            m = json.load(f)
        m.update(fields)
        with open(path, "w") as f:
            json.dump(m, f)

    copy("other-keys", key_type="block_output")
    assert "key type 'block_output' but the model's is 'ffn_input_after_ln'" in error("--datastore", "other-keys")
    copy("unindexed", index=None)
    assert "has no FAISS index" in error("--datastore", "unindexed")
    copy("unfinished", status="building")
    assert "unfinished" in error("--datastore", "unfinished")
    assert "--batch-size 0" in error("--datastore", "train", "--batch-size", "0")
    assert f"only {project.store.size} entries" in error("--datastore", "train", "--k", str(project.store.size + 1))
    # an index that belongs to another datastore (or was cut short) is noticed before it is used
    import faiss
    import numpy as np

    copy("swapped")
    small = faiss.IndexFlatL2(project.store.dim)
    small.add(np.asarray(project.store.keys[:10], np.float32))
    faiss.write_index(small, os.path.join(stores, "swapped", "index.faiss"))
    assert "holds 10" in error("--datastore", "swapped", "--lmbda", "0.3", "--temperature", "1")
    copy("ivf", index=dict(file="index.faiss", factory="IVF4,Flat", ntotal=project.store.size, nprobe=2))
    ivf = faiss.index_factory(project.store.dim, "IVF4,Flat")
    keys = np.asarray(project.store.keys, np.float32)
    ivf.train(keys)
    ivf.add(keys)
    faiss.write_index(ivf, os.path.join(stores, "ivf", "index.faiss"))
    assert "4 inverted lists" in error("--datastore", "ivf", "--nprobe", "9", "--lmbda", "0.3", "--temperature", "1")


def test_device_search_with_fewer_searches_from_the_command_line(project, tmp_path):
    out = evaluate(project, "--datastore", "train", "--split", "test", "--k", "16", "--max-tokens", "150",
                   "--search", "device", "--retomaton", "2", "--retrieve-fraction", "0.5",
                   "--out", str(tmp_path / "dev"), devices=2)  # keys sharded over 2 devices
    assert out.returncode == 0, out.stderr
    assert "retrieval: both (--retomaton 2, --retrieve-fraction 0.5); saved searches (FoSS) valid" in out.stdout
    with open(tmp_path / "dev" / "results.json") as f:
        r = json.load(f)
    assert r["index"] == "exact on device (JAX)" and r["retrieval"]["foss"]["test"] > 0.4
    assert r["rows"][1]["ppl"] < r["rows"][0]["ppl"]
    # the full kNN-LM on 2 devices' keys against FAISS's Flat index: the same perplexity
    for search in ("device", "auto"):
        out = evaluate(project, "--datastore", "train", "--split", "test", "--k", "16", "--max-tokens", "150",
                       "--lmbda", "0.3", "--temperature", "2", "--search", search,
                       "--out", str(tmp_path / search), devices=2)
        assert out.returncode == 0, out.stderr
    ppl = [json.load(open(tmp_path / s / "results.json"))["rows"][1]["ppl"] for s in ("device", "auto")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


def test_a_full_disk_for_the_per_token_files_is_one_line_not_sigbus(project, tmp_path):
    """A real small tmpfs (needs mount rights): the files are reserved up front, so a full disk is
    an error before the pass, not SIGBUS inside it, and no partial files stay behind."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "none", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (no mount rights)")
    try:
        out = evaluate(project, "--datastore", "train", "--split", "test", "--lmbda", "0.25", "--temperature", "1",
                       "--out", str(mnt / "eval"))
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert "No space left on device: the per-token files need more space" in lines[0]
        assert os.listdir(mnt / "eval") == []  # the .tmp directory was removed
    finally:
        subprocess.run(["umount", str(mnt)])
