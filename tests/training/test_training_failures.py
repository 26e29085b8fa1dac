"""Training runs that go wrong: divergence, damaged checkpoints, bad configs, unwritable directories.

Each goes through the real ``train.py`` and must end with one line on stderr and exit 2,
leaving only finite, verified checkpoints behind.
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from helpers import ROOT, tiny_config
from knnlm_jax.core.checkpoint import Checkpointer, abstract_like
from knnlm_jax.configs import get_config, validate
from knnlm_jax.models.transformer import ModelConfig
from knnlm_jax.training.optim import make_optimizer
from knnlm_jax.models.steps import abstract_model
from knnlm_jax.training.loop import train

pytestmark = pytest.mark.slow(8)

QUIET = dict(progress=False, log=lambda *a: None)


def cli_args(config) -> list[str]:
    """``train.py`` flags that reproduce ``config`` (a shrunk ``tiny``)."""
    base, args = get_config("tiny"), ["--data_dir", config.data_dir, "--no-progress"]
    for key, value in config.items():
        if key != "data_dir" and value != base[key]:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            args += ["--set", f"{key}={text}"]
    return args


def run_train(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def one_error_line(out) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[0].startswith("train.py: error: ")
    return lines[0]


def restore_all(config, directory):
    """Every checkpoint in ``directory``, restored (which verifies checksums and finiteness)."""
    cfg = ModelConfig.from_config(config, vocab_size=len(open(os.path.join(directory, "..", "vocab.txt")).readlines()))
    _, params = abstract_model(cfg)
    target = dict(params=params, opt_state=jax.eval_shape(make_optimizer(config).init, params),
                  step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    ckpt = Checkpointer(directory)
    steps = sorted(ckpt._manager.all_steps())
    trees = [ckpt.restore(abstract_like(target), step)[0] for step in steps]
    ckpt.close()
    return steps, trees


def diverging(data_dir, **overrides):
    """Plain SGD-with-momentum at lr 1e4, no clipping: the loss is NaN within a few updates."""
    return tiny_config(data_dir, optimizer="nag", lr=1e4, clip_norm=0.0, max_steps=10, eval_every=5,
                       checkpoint_every=2, keep_checkpoints=10, dropout=0.0, **overrides)


def test_a_diverging_run_stops_with_one_line_and_keeps_only_finite_checkpoints(tmp_path, wikitext_dir):
    config, work = diverging(wikitext_dir), str(tmp_path / "run")
    out = run_train(*cli_args(config), "--workdir", work)
    line = one_error_line(out)
    assert "not finite at step" in line and "diverged" in line and "lr" in line, line
    assert "NaN" not in out.stdout
    bad_step = int(line.split("at step ")[1].split()[0])
    steps, trees = restore_all(config, os.path.join(work, "checkpoints"))
    assert steps and all(s < bad_step for s in steps)  # restore_all refused any non-finite or damaged one
    assert f"the last finite checkpoint is step {steps[-1]} in" in line
    assert all(bool(jnp.isfinite(x).all()) for t in trees for x in jax.tree_util.tree_leaves(t["params"]))


def _data_files(directory):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs if os.path.basename(r) == "d")


def test_a_damaged_checkpoint_is_refused_not_resumed(tmp_path, wikitext_dir):
    config, work = tiny_config(wikitext_dir, max_steps=4, eval_every=4, checkpoint_every=2), str(tmp_path / "run")
    train(config, work, **QUIET)
    shutil.rmtree(os.path.join(work, "checkpoints", "4"))  # as if killed: a resume would train from step 2 on
    # bytes flipped in every data file (orbax may leave files the checkpoint does not reference)
    flipped = {}
    for path in _data_files(os.path.join(work, "checkpoints", "2")):
        data = bytearray(open(path, "rb").read())
        at = len(data) * 2 // 5
        data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
        open(path, "wb").write(data)
        flipped[path] = bytes(data)
    out = run_train(*cli_args(config), "--workdir", work)
    line = one_error_line(out)
    assert "checkpoint" in line and "step 2" in line or "/2 " in line, line
    assert "damaged" in line or "unreadable" in line, line
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2"]
    assert all(open(path, "rb").read() == data for path, data in flipped.items())  # left for the user to delete


@pytest.mark.parametrize("override,fragment", [("num_layers=-1", "num_layers"), ("lr=0", "lr"), ("cutoffs=20,8", "cutoffs")])
def test_impossible_values_are_refused_before_anything_is_written(tmp_path, override, fragment):
    work = tmp_path / "run"
    line = one_error_line(run_train("--config", "tiny", "--workdir", str(work), "--set", override))
    assert fragment in line, line
    assert not work.exists()


@pytest.mark.parametrize("key,value", [
    ("d_model", 0), ("num_heads", -2), ("d_ff", 0), ("tokens_per_sample", 0), ("batch_size", 0),
    ("eval_batch_size", -4), ("update_freq", 0), ("max_steps", -5), ("vocab_size", -3), ("vocab_size", 3),
    ("lr", -1e-3), ("lr", float("nan")), ("dropout", 1.0), ("attention_dropout", -0.1), ("momentum", 1.5),
    ("clip_norm", -1.0), ("warmup_steps", -1), ("cutoffs", (0, 10)), ("d_model", 30), ("optimizer", "sgd"),
    ("patience", -1), ("patience", 1.5),
])
def test_validate_names_the_field(key, value):
    config = get_config("tiny")
    with config.ignore_type():
        config[key] = value
    with pytest.raises(ValueError, match=key):
        validate(config)
    validate(get_config("wt103"))


def test_a_refused_run_leaves_no_config_behind(tmp_path, wikitext_dir):
    work = str(tmp_path / "run")
    with pytest.raises(ValueError, match="fewer than one update"):  # refused once the data is read
        train(tiny_config(wikitext_dir, batch_size=4096, eval_batch_size=4096), work, **QUIET)
    assert not os.path.exists(os.path.join(work, "config.json"))


def test_an_unwritable_checkpoint_directory_is_one_line_then_resumable(tmp_path, wikitext_dir):
    config, work = tiny_config(wikitext_dir, max_steps=2, eval_every=2), tmp_path / "run"
    work.mkdir()
    (work / "checkpoints").write_text("a file where the checkpoint directory goes")
    line = one_error_line(run_train(*cli_args(config), "--workdir", str(work)))
    assert "cannot write" in line and "checkpoints" in line, line
    os.remove(work / "checkpoints")  # space freed / directory fixed: the same command now runs
    assert train(config, str(work), **QUIET)["steps"] == 2


FAILED_SAVE = r"""
import os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, os.path.join({root!r}, "tests"))
from knnlm_jax.core.checkpoint import Checkpointer
from knnlm_jax.cli import user_errors
from helpers.training_state import make_state
with user_errors("train.py"):
    ckpt = Checkpointer({path!r})
    os.rmdir({path!r}); open({path!r}, "w").close()  # the directory is gone mid-run, as on a failing disk
    ckpt.save(1, make_state(0), {{}})
"""


def test_a_write_failing_inside_orbax_is_one_line_and_does_not_hang(tmp_path):
    path = str(tmp_path / "ckpt")
    out = subprocess.run([sys.executable, "-c", FAILED_SAVE.format(root=ROOT, path=path)], capture_output=True,
                         text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert f"cannot write {path}: [Errno" in one_error_line(out)


def test_tensorstore_write_errors_are_read_as_the_os_error_they_name():
    from knnlm_jax.core.checkpoint import CheckpointError, _writing

    message = ('RESOURCE_EXHAUSTED: Error writing "params.x/0.0" in OCDBT database at local file "/d/best/20": '
               "Failed to write 512 bytes to file 15: No space left on device [os_error_code='28']")
    with pytest.raises(CheckpointError, match=r"cannot write /d: \[Errno 28\] No space left on device; fix it"):
        with _writing("/d"):
            raise ValueError(message)
    with pytest.raises(ValueError, match="unrelated"):  # anything else passes through
        with _writing("/d"):
            raise ValueError("unrelated")


FULL_DISK = r"""
import os, subprocess, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, os.path.join({root!r}, "tests"))
from knnlm_jax.core.checkpoint import Checkpointer
from knnlm_jax.cli import user_errors
from helpers.training_state import make_state
with user_errors("train.py"):
    ckpt = Checkpointer({path!r})
    filler = os.path.join({path!r}, "filler")
    with open(filler, "wb") as f:  # fill the disk ...
        try:
            f.write(b"x" * (1 << 30))
        except OSError:
            pass
    os.truncate(filler, os.path.getsize(filler) - {room})  # ... but for a little: orbax fails mid-write
    ckpt.save(1, make_state(0), {{}})
"""


def test_a_full_disk_inside_orbax_is_one_line(tmp_path):
    """A real small tmpfs (needs mount rights: root outside a locked-down container)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (no mount rights)")
    try:
        path = str(mnt / "ckpt")
        for room in (16 << 10,):  # some room left: tensorstore (C++) fails mid-write; no room at all: reliability.py
            out = subprocess.run([sys.executable, "-c", FULL_DISK.format(root=ROOT, path=path, room=room)],
                                 capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                 timeout=120)
            line = one_error_line(out)
            assert f"cannot write {path}: [Errno 28] No space left on device" in line, out.stderr
            subprocess.run(["rm", "-rf", path])
    finally:
        subprocess.run(["umount", str(mnt)])
