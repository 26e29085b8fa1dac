"""The datastore: windows, key/value alignment by recomputation, resume, and the reader's checks."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.tiny_run import build_store, make_run
from knnlm_jax import runs
from knnlm_jax.datastore.building import (KEY_RTOL, KEY_ATOL, BuildSpec, CorpusInfo, build_datastore, check_datastore,
                                          window_sizes)
from knnlm_jax.datastore.indexing import index_datastore
from knnlm_jax.datastore.format import (BUILD_IDENTITY, FORMAT_VERSION, KEYS, MANIFEST, SHARDED, VALS, DatastoreError,
                                 open_datastore, read_manifest, update_manifest)
from knnlm_jax.datastore.writer import DatastoreWriter, begin_sharded
from knnlm_jax.data.windows import WindowSpec, token_stream, window_batch, window_of, windows
from knnlm_jax.retrieval.index import search
from knnlm_jax.models.transformer import forward_with_keys


# ---------------------------------------------------------------------------------
# windows


def test_windows_give_every_target_exactly_one_entry_with_its_context():
    rng = np.random.default_rng(0)
    for n in list(range(1, 40)) + [int(x) for x in rng.integers(40, 500, size=20)]:
        for length in (1, 2, 3, 5, 8, 16):
            for context in sorted({0, 1, length // 2, length - 1}):
                if context >= length:
                    continue
                w = windows(n, length, context)
                assert w[0, 0] == 0 and w[0, 1] == 0 and w[0, 2] == min(n, length)
                np.testing.assert_array_equal(w[1:, 1], w[:-1, 2])  # spans tile [0, n): no gap, no overlap
                assert w[-1, 2] == n
                assert np.all(w[:, 2] > w[:, 1])
                assert len(w) == 1 + -(-max(0, n - length) // (length - context))
                assert np.all(w[:, 0] >= 0) and np.all(w[:, 2] - w[:, 0] <= length)
                later = w[1:]
                assert np.all(later[:, 1] - later[:, 0] >= context)  # every later entry sees >= C prior tokens
                assert np.all(w[:, 0] == np.maximum(w[:, 2] - length, 0))
                tokens = rng.integers(4, 50, size=n).astype(np.int32)
                stream = token_stream(tokens, 2)
                inputs, targets, mask = window_batch(stream, w, length, 2, rows=len(w) + 1)
                np.testing.assert_array_equal(targets[mask], tokens)  # values in order, one per token
                np.testing.assert_array_equal(inputs[mask], stream[:-1])  # key n is read at input position n
                assert not mask[-1].any()  # a padding row has no entries
                if n >= length:
                    assert np.all(w[:, 0] + length <= n)  # full windows: no padding inside the stream


def test_build_capacities_fit_every_batch_as_band_capacities_would():
    from knnlm_jax.models.adaptive import band_capacities
    from knnlm_jax.models.adaptive import build_capacities

    rng = np.random.default_rng(3)
    edges = (0, 8, 20, 40)
    for n in (5, 100, 1000, 3333):
        tokens = rng.integers(0, 40, n).astype(np.int32)
        w = windows(n, 16, 8)
        stream = token_stream(tokens, 2)
        per_batch = [band_capacities(window_batch(stream, w[i : i + 4], 16, 2, rows=4)[1], edges)
                     for i in range(0, len(w), 4)]
        assert build_capacities(tokens, w, 4, edges, 16) == tuple(np.max(per_batch, axis=0))


def test_window_of_finds_the_span_holding_an_entry():
    w = windows(50, 8, 3)
    for e in range(50):
        i = window_of(w, e)
        assert w[i, 1] <= e < w[i, 2]


# ---------------------------------------------------------------------------------
# stored entries against the model


def test_each_entry_is_the_models_key_of_its_own_context_and_the_next_token(built):
    b, store = built, built.store
    n, length, context = len(b.tokens), b.window, b.context
    w = windows(n, length, context)
    assert len(w) > 8 and w[-1, 2] - w[-1, 1] != length - context  # several windows; a truncated last span
    boundaries = np.concatenate([w[:, 1], w[:, 2] - 1])
    rng = np.random.default_rng(1)
    entries = np.unique(np.concatenate([np.arange(length), rng.choice(boundaries, 12), [n - 1],
                                        rng.choice(n, 16)]))
    stream = token_stream(b.tokens, b.vocab.eos)
    # one forward over each entry's context alone, left-aligned and padded after it (causal: padding is unseen)
    inputs = np.full((len(entries), length), b.vocab.eos, np.int32)
    starts = w[window_of(w, entries), 0]
    for row, (e, a) in enumerate(zip(entries, starts)):
        assert e + 1 - a <= length and (e - a >= context or a == 0)
        if e < length or e == n - 1 or e in w[:, 2] - 1:
            assert a == max(0, e + 1 - length)  # first window, span ends, the last token
        inputs[row, : e + 1 - a] = stream[a : e + 1]
    _, keys = jax.jit(forward_with_keys, static_argnums=3)(b.trained.model(), inputs, inputs, b.config.key_type)
    fresh = np.asarray(keys)[np.arange(len(entries)), entries - starts]
    stored = np.asarray(store.keys[entries], np.float32)
    np.testing.assert_allclose(stored, fresh, rtol=KEY_RTOL, atol=KEY_ATOL)
    previous = np.asarray(keys)[np.arange(len(entries)), np.maximum(entries - starts - 1, 0)]
    off_by_one = np.abs(stored - previous).max(axis=1)[entries > starts]
    assert np.all(off_by_one > 10 * KEY_ATOL)  # the comparison would catch a key one position early
    np.testing.assert_array_equal(store.vals[entries], stream[entries + 1])
    np.testing.assert_array_equal(store.vals, b.tokens)


def test_manifest_describes_the_build(built):
    m = built.manifest
    assert m["status"] == "complete" and m["progress"] == m["num_entries"] == len(built.tokens)
    assert (m["dim"], m["dtype"], m["key_type"]) == (16, "float16", "ffn_input_after_ln")
    assert (m["window"], m["context"], m["split"]) == (16, 8, "train")
    assert m["vocab_fingerprint"] == built.vocab.fingerprint() and m["corpus_sha256"] == built.split.sha256
    assert m["model_fingerprint"] == built.trained.fingerprint and m["checkpoint_step"] == 3
    assert np.isfinite(m["lm_nll_sum"]) and m["lm_nll_sum"] > 0


def test_check_recomputes_entries_and_catches_damage(built, tmp_path):
    report = check_datastore(built.store, built.trained, built.tokens, built.vocab.eos, sample=16)
    assert report["max_key_difference"] <= KEY_ATOL and report["entries_checked"] >= 16
    copy = str(tmp_path / "copy")
    shutil.copytree(built.directory, copy)
    keys = np.load(os.path.join(copy, KEYS), mmap_mode="r+")
    keys[-1] += 1.0  # the last entry is always checked
    keys.flush()
    with pytest.raises(DatastoreError, match="key of entry"):
        check_datastore(open_datastore(copy), built.trained, built.tokens, built.vocab.eos, sample=4)
    vals = np.load(os.path.join(copy, VALS), mmap_mode="r+")
    vals[7] += 1
    vals.flush()
    with pytest.raises(DatastoreError, match="value of entry 7"):
        check_datastore(open_datastore(copy), built.trained, built.tokens, built.vocab.eos, sample=4)


def test_flat_index_finds_each_stored_key_at_distance_zero(built, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(built.directory, copy)
    store = open_datastore(copy, built.signature)
    info = index_datastore(store, progress=False)
    assert info["factory"] == "Flat" and info["ntotal"] == store.size and info["nprobe"] == 32
    assert read_manifest(copy)["index"] == info and store.index_path
    from knnlm_jax.retrieval.index import read_index

    index = read_index(store.index_path)
    ids = np.random.default_rng(2).choice(store.size, 64, replace=False)
    queries = np.asarray(store.keys[ids], np.float32)
    dists, found = search(index, queries, 4)
    np.testing.assert_array_equal(dists[:, 0], 0.0)
    np.testing.assert_array_equal(np.asarray(store.keys[found[:, 0]], np.float32), queries)  # itself or a duplicate


# ---------------------------------------------------------------------------------
# resume and overwrite


def test_a_killed_build_resumes_to_identical_bytes(built, tmp_path):
    directory = tmp_path / "ds"

    class Killed(Exception):
        pass

    chunks = []

    def kill_after_three(progress):
        chunks.append(progress)
        if len(chunks) == 3:
            raise Killed

    with pytest.raises(Killed):
        build_store(built, directory, on_chunk=kill_after_three)
    manifest = read_manifest(directory)
    assert manifest["status"] == "building" and manifest["progress"] == chunks[-1] > 0
    with pytest.raises(DatastoreError, match="unfinished"):
        open_datastore(str(directory))
    keys = np.load(directory / KEYS, mmap_mode="r+")  # a half-written next chunk, as after a kill
    keys[manifest["progress"] :] = 7.0
    keys.flush()
    del keys
    messages = []
    final = build_store(built, directory, batch_size=8, log=messages.append)  # the saved batch size wins
    assert any(f"at entry {chunks[-1]}" in m for m in messages)
    for name in (KEYS, VALS):
        assert (directory / name).read_bytes() == open(os.path.join(built.directory, name), "rb").read()
    assert final["lm_nll_sum"] == built.manifest["lm_nll_sum"]


def test_complete_datastores_are_kept_and_unfinished_ones_must_match(built, tmp_path):
    directory = str(tmp_path / "ds")
    shutil.copytree(built.directory, directory)
    header = {k: built.manifest[k] for k in BUILD_IDENTITY}
    with pytest.raises(DatastoreError, match="already exists"):
        DatastoreWriter(directory, header)
    writer = DatastoreWriter(directory, header, overwrite=True)
    assert writer.progress == 0 and read_manifest(directory)["status"] == "building"
    del writer
    with pytest.raises(DatastoreError, match="unfinished build with another corpus_sha256"):
        DatastoreWriter(directory, dict(header, corpus_sha256="0" * 64))
    # a subword text encoded line by line (a manifest without text_encoding) is not resumed as a whole-text one
    with pytest.raises(DatastoreError, match="unfinished build with another text_encoding"):
        DatastoreWriter(directory, dict(header, text_encoding="text"))


def test_unfinished_builds_of_another_format_or_key_mode_are_refused_one_process_or_sharded(built, tmp_path):
    header = {k: built.manifest[k] for k in BUILD_IDENTITY}
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    DatastoreWriter(single, header)
    n = built.manifest["num_entries"]
    ranges = [(0, n // 2), (n // 2, n)]
    assert begin_sharded(sharded, header, ranges)["status"] == "building"
    assert begin_sharded(sharded, header, ranges)["layout"] == SHARDED  # the same build resumes
    with pytest.raises(DatastoreError, match="unfinished build with another keys"):
        begin_sharded(sharded, dict(header, keys="none"), ranges)
    for directory, reopen in ((single, lambda: DatastoreWriter(single, header)),
                              (sharded, lambda: begin_sharded(sharded, header, ranges))):
        update_manifest(directory, format_version=FORMAT_VERSION - 1)
        with pytest.raises(DatastoreError, match="unfinished build with another format_version"):
            reopen()
    with pytest.raises(DatastoreError, match="unfinished \\(a sharded build by 2 processes\\)"):
        update_manifest(sharded, format_version=FORMAT_VERSION)
        open_datastore(sharded)


# ---------------------------------------------------------------------------------
# the reader


def test_reader_refuses_another_model_with_the_reason(built):
    s = built.signature
    cases = [(dict(dim=128), "datastore train has key dimension 16 but the model's is 128"),
             (dict(key_type="block_output"), "has key type 'ffn_input_after_ln' but the model's is 'block_output'"),
             (dict(vocab_fingerprint="f" * 64, vocab_size=99), "built with vocabulary .* but the model's is ffff"),
             (dict(fingerprint="e" * 64, step=9), "other model weights")]
    for change, message in cases:
        with pytest.raises(DatastoreError, match=message):
            open_datastore(built.directory, dataclasses.replace(s, **change))
    open_datastore(built.directory, dataclasses.replace(s, fingerprint=None))  # weights not loaded: not compared


def test_reader_refuses_missing_truncated_or_resized_files(built, tmp_path):
    def damaged(how):
        copy = tmp_path / how
        shutil.copytree(built.directory, copy)
        return copy

    def truncate(copy):
        with open(copy / KEYS, "r+b") as f:
            f.truncate(os.path.getsize(copy / KEYS) // 2)

    cases = [("truncated", truncate, "keys.npy is truncated or damaged"),
             ("missing", lambda copy: os.remove(copy / VALS), "vals.npy is missing"),
             ("resized", lambda copy: update_manifest(str(copy), num_entries=built.manifest["num_entries"] + 1),
              "manifest says"),
             ("no-manifest", lambda copy: os.remove(copy / MANIFEST), "no datastore")]
    for how, damage, message in cases:
        copy = damaged(how)
        damage(copy)
        with pytest.raises(DatastoreError, match=message):
            open_datastore(str(copy))


# ---------------------------------------------------------------------------------
# run directories


def test_a_run_without_best_loads_its_latest_checkpoint(built, tmp_path):
    workdir = str(tmp_path / "run")
    make_run(built.data_dir, workdir, layout="checkpoints")
    config = runs.run_config(workdir)
    trained = runs.load_model(workdir, config, runs.load_vocab(workdir, config))
    assert (trained.source, trained.step) == ("checkpoints", 3)
    assert trained.fingerprint == built.trained.fingerprint  # same seed, same weights


def test_latest_run_is_the_most_recently_modified(tmp_path):
    root = tmp_path / "runs"
    for i, name in enumerate(("a", "b", "c")):
        (root / name / "best" / "5").mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
        for p in (root / name / "config.json", root / name / "best"):
            os.utime(p, (1000 + i, 1000 + i))
    os.utime(root / "a" / "best", (5000, 5000))
    (root / "notarun").mkdir()
    assert runs.latest_run(str(root)) == str(root / "a")
    with pytest.raises(runs.RunError, match="no trained run"):
        runs.latest_run(str(tmp_path / "nothing"))


def test_run_config_takes_new_defaults_and_locks_the_model(built, tmp_path):
    import json

    with open(os.path.join(built.workdir, "config.json")) as f:
        saved = json.load(f)
    old = {k: v for k, v in saved.items() if not k.startswith("build_")}  # a run trained before build.py
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert window_sizes(runs.run_config(str(tmp_path))) == (16, 8)
    config = runs.run_config(str(tmp_path), ["key_type=block_output", "build_context=4"])
    assert config.key_type == "block_output" and window_sizes(config) == (16, 4)
    assert config.derived.vocab_size == len(built.vocab)
    from knnlm_jax.configs import ConfigError

    with pytest.raises(ConfigError, match="cannot change the trained model's d_model"):
        runs.run_config(built.workdir, ["d_model=32"])
    # a wt103 run saved before the speed fields keeps the numerics it was trained with, not bf16
    old = dict({k: v for k, v in saved.items() if k not in runs.LEGACY_NUMERICS}, name="wt103")
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = runs.run_config(str(tmp_path))
    assert (config.compute_dtype, config.attention_impl, config.remat) == ("float32", "explicit", False)


def test_keys_that_overflow_float16_are_refused_at_build_and_at_check(built, tmp_path):
    """A residual-stream key beyond 65,504 becomes inf in float16: never stored silently, found by --check."""
    from knnlm_jax.datastore.content_hash import verify_content

    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, 1e5) if "fc2" in jax.tree_util.keystr(path) and "bias" in
        jax.tree_util.keystr(path) else x, built.trained.params)
    huge = dataclasses.replace(built.trained, params=params)
    signature = dataclasses.replace(built.signature, key_type="block_output")
    with pytest.raises(DatastoreError, match="not finite in float16"):
        spec = BuildSpec(CorpusInfo(built.split.corpus, built.split.sha256, "train"),
                         WindowSpec(built.window, built.context), 4, progress=False)
        build_datastore(str(tmp_path / "huge"), huge, signature, built.tokens, built.vocab.eos, spec,
                        log=lambda *a: None)
    assert read_manifest(str(tmp_path / "huge"))["status"] == "building"
    damaged = tmp_path / "damaged"
    shutil.copytree(built.directory, damaged)
    keys = np.load(damaged / KEYS, mmap_mode="r+")
    keys[5, 3] = np.inf
    keys.flush()
    del keys
    with pytest.raises(DatastoreError, match="key of entry 5 is not finite"):
        verify_content(open_datastore(str(damaged), built.signature))
