"""build.py end to end (subprocesses): the default build, any corpus, --check, --index-only, user errors."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import write_corpus
from helpers.tiny_run import make_run
from helpers.tools import assert_user_error, build_py, manifest

pytestmark = pytest.mark.slow(7)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A directory with ``runs/tiny`` (a run) and, built by ``python build.py``, its ``train`` datastore."""
    root = tmp_path_factory.mktemp("project")
    make_run(write_corpus(root / "corpus", n_train=60), str(root / "runs" / "tiny"))
    out = build_py(cwd=root)
    assert out.returncode == 0, out.stderr
    return root, out


def test_no_arguments_build_the_latest_runs_training_corpus(project):
    root, out = project
    directory = root / "runs" / "tiny" / "datastores" / "train"
    m = manifest(directory)
    (tokens_path,) = (root / "runs" / "tiny" / "tokens").glob("train-*.npy")
    tokens = np.load(tokens_path)
    assert m["status"] == "complete" and m["num_entries"] == len(tokens) and m["corpus"] == str(root / "corpus")
    np.testing.assert_array_equal(np.load(directory / "vals.npy"), tokens)
    assert np.load(directory / "keys.npy").shape == (len(tokens), 16)
    assert m["index"]["factory"] == "Flat" and (directory / "index.faiss").is_file()
    assert f"datastore train: {len(tokens)} entries" in out.stdout


def test_check_then_reindex(project):
    root, _ = project
    out = build_py("--check", "train", "--sample", "8", cwd=root, devices=2)  # recomputed on a 2-device mesh
    assert out.returncode == 0, out.stderr
    assert "datastore train ok" in out.stdout and "max difference 0)" in out.stdout  # bit-identical keys
    out = build_py("--datastore", "train", "--index-only", "--index", "IVF4,PQ4", "--nprobe", "2", cwd=root)
    assert out.returncode == 0, out.stderr
    m = manifest(root / "runs" / "tiny" / "datastores" / "train")
    info = m["index"]
    assert (info["factory"], info["nprobe"], info["ntotal"]) == ("IVF4,PQ4", 2, m["num_entries"])


def test_a_build_whose_index_step_was_killed_is_finished_by_the_same_command(project):
    from knnlm_jax.datastore.format import update_manifest

    root, _ = project
    out = build_py("--datastore", "again", "--no-index", cwd=root)
    assert out.returncode == 0, out.stderr
    directory = root / "runs" / "tiny" / "datastores" / "again"
    update_manifest(str(directory), index=None)  # as a build killed while indexing leaves it
    out = build_py("--datastore", "again", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "not indexed; indexing it" in out.stderr and manifest(directory)["index"]["ntotal"] == manifest(
        directory)["num_entries"]
    out = build_py("--datastore", "again", cwd=root)  # complete and indexed: the same command has nothing to do
    assert out.returncode == 0 and "nothing to do" in out.stdout


def test_check_reads_every_byte_against_the_hashes_recorded_at_build_time(project):
    root, _ = project
    stores = root / "runs" / "tiny" / "datastores"
    shutil.copytree(stores / "train", stores / "damaged")
    keys = np.load(stores / "damaged" / "keys.npy", mmap_mode="r+")
    row = len(keys) // 2
    keys[row, 0] = keys[row, 0] + np.float16(0.5)  # one value changed: the sampled recompute would likely miss it
    keys.flush()
    del keys
    out = build_py("--check", "damaged", "--sample", "2", cwd=root)
    assert out.returncode == 2 and "keys.npy does not match the sha256 recorded at build time" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = build_py("--check", "train", "--sample", "2", cwd=root)
    assert out.returncode == 0 and "match the sha256 recorded at build time" in out.stdout, out.stderr


def test_a_zero_batch_size_is_refused(project):
    root, _ = project
    out = build_py("--datastore", "zero", "--batch-size", "0", cwd=root)
    assert out.returncode == 2 and "--batch-size 0" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (root / "runs" / "tiny" / "datastores" / "zero").exists()


def test_any_text_file_in_the_models_vocabulary(project):
    root, _ = project
    text = root / "notes.txt"
    text.write_text(" the cat sat on zebra .\n the dog ran .\n")
    out = build_py("--corpus", str(text), cwd=root)
    assert out.returncode == 0, out.stderr
    directory = root / "runs" / "tiny" / "datastores" / "notes"
    m = manifest(directory)
    assert (m["corpus"], m["num_entries"], m["status"]) == (str(text), 12, "complete")
    vals = np.load(directory / "vals.npy")
    assert vals[4] == 3 and vals[6] == vals[11] == 2  # zebra is <unk>; each line ends with </s>


def test_raw_text_tokenised_as_wikitext_is_recorded_and_followed_by_evaluation(project):
    from knnlm_jax.evaluations import with_datastore_options

    root, _ = project
    text = root / "raw.txt"
    text.write_text("The cat sat, on the mat.\nA dog-like cat ran 1,000 miles.\n")
    plain = build_py("--corpus", str(text), "--datastore", "raw-plain", cwd=root)
    tokenised = build_py("--corpus", str(text), "--datastore", "raw-wt", "--tokenize", "wikitext", cwd=root)
    assert plain.returncode == 0 and tokenised.returncode == 0, plain.stderr + tokenised.stderr
    m_plain, m_wt = (manifest(root / "runs" / "tiny" / "datastores" / n) for n in ("raw-plain", "raw-wt"))
    assert m_plain["num_entries"] == 7 + 7 and m_wt["num_entries"] == 9 + 12  # "sat," vs "sat ,"; "dog @-@ like"
    assert m_wt["corpus_options"]["tokenize"] == "wikitext" and m_plain["corpus_options"]["tokenize"] is None
    assert m_wt["corpus_sha256"] != m_plain["corpus_sha256"]  # the sha256 is of the text as tokenised
    notes = []
    assert with_datastore_options(m_wt, str(text), {}, notes.append)["tokenize"] == "wikitext"
    assert with_datastore_options(m_wt, str(root / "other.txt"), {}, notes.append) == {}  # another text: as given
    assert with_datastore_options(m_wt, str(text), {"tokenize": "x"}, notes.append)["tokenize"] == "x" and notes


def test_a_run_trained_on_wikitext_tokenised_text_stores_that_text(tmp_path):
    """A run trained with ``--tokenize wikitext`` on a directory records it: its default build stores the
    very text it was trained on. A run that does not record it (made before it was recorded) is refused
    with a line naming the option, not built over the text split differently."""
    corpus = tmp_path / "raw"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.txt").write_text("The cat sat, on the mat.\nA dog-like cat ran 1,000 miles.\n" * 4)
    workdir = tmp_path / "runs" / "tiny"
    make_run(str(corpus), str(workdir), corpus_options={"tokenize": "wikitext"})
    config = json.loads((workdir / "config.json").read_text())
    assert config["derived"]["corpus_options"] == {"tokenize": "wikitext"}
    out = build_py(cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    m = manifest(workdir / "datastores" / "train")
    assert m["corpus_options"]["tokenize"] == "wikitext" and m["corpus_sha256"] == config["derived"]["train_sha256"]
    assert m["num_entries"] == 4 * (9 + 12)  # "sat ,", "dog @-@ like", "1 @,@ 000"; each line and its end

    del config["derived"]["corpus_options"]
    (workdir / "config.json").write_text(json.dumps(config))
    assert_user_error(build_py("--datastore", "old", cwd=tmp_path), "not the text the run was trained on",
                      "--tokenize wikitext")
    assert not (workdir / "datastores" / "old" / "manifest.json").exists()
    again = build_py("--datastore", "old", "--tokenize", "wikitext", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_bad_input_is_one_line_on_stderr(project, tmp_path):
    root, _ = project
    stores = root / "runs" / "tiny" / "datastores"
    again = build_py(cwd=root)  # the same build: complete, nothing to do
    assert again.returncode == 0 and "already complete" in again.stdout and "nothing to do" in again.stdout
    assert_user_error(build_py("--datastore", "train", "--split", "valid", cwd=root), "datastore train already exists",
                      "--overwrite")
    assert_user_error(build_py("--index", "IVF2,Flat", cwd=root), "datastore train already exists", "--index-only")
    assert_user_error(build_py("--datastore", "x", "--corpus", str(root / "nowhere"), cwd=root),
                      "no such data directory or file")
    (root / "empty.txt").write_text("\n \n")
    assert_user_error(build_py("--corpus", str(root / "empty.txt"), cwd=root), "empty")
    assert_user_error(build_py(cwd=tmp_path), "no trained run")
    assert_user_error(build_py("--index-only", "--set", "key_type=block_output", cwd=root),
                      "key type 'ffn_input_after_ln' but the model's is 'block_output'")

    def damaged(name, field=None, value=None, file_change=None):
        shutil.copytree(stores / "train", stores / name)
        if field:
            m = manifest(stores / name)
            m[field] = value
            (stores / name / "manifest.json").write_text(json.dumps(m))
        if file_change:
            file_change(stores / name / "keys.npy")
        return build_py("--datastore", name, "--index-only", cwd=root)

    assert_user_error(damaged("dim", "dim", 32), "datastore dim has key dimension 32 but the model's is 16")
    assert_user_error(damaged("vocab", "vocab_fingerprint", "0" * 64), "built with vocabulary (tokenizer) 000000000000")
    assert_user_error(damaged("missing", file_change=os.remove), "keys.npy is missing")
    assert_user_error(damaged("short", file_change=lambda p: os.truncate(p, os.path.getsize(p) - 64)),
                      "keys.npy is truncated")


def test_an_unwritable_datastore_directory_is_one_line(project, tmp_path):
    root, _ = project
    blocked = root / "runs" / "tiny" / "datastores" / "blocked"
    blocked.write_text("a file where the datastore directory goes")
    try:
        out = build_py("--datastore", "blocked", cwd=root)
        assert out.returncode == 2 and "cannot write or read" in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    finally:
        blocked.unlink()
