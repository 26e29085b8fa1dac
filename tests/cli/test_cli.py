"""Command-line behaviour: bad input gives one clear line on stderr and a non-zero exit."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT
from helpers.tools import assert_user_error

pytestmark = pytest.mark.slow(11)


def run(*args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True,
                          text=True, env=env, cwd=cwd or ROOT, timeout=300)


def test_dry_run_prints_the_exact_parameter_count():
    out = run("--config", "wt103", "--set", "vocab_size=267735", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "parameters: 246932928" in out.stdout.splitlines()


def test_unknown_config_and_unknown_key():
    assert_user_error(run("--config", "nope", "--dry-run"), "unknown config 'nope'")
    assert_user_error(run("--config", "tiny", "--set", "nope=1", "--dry-run"), "unknown config key 'nope'")
    assert_user_error(run("--config", "tiny", "--set", "lr=fast", "--dry-run"), "bad value for lr")


def test_missing_data_dir_missing_split_and_empty_corpus(tmp_path, wikitext_dir):
    assert_user_error(run("--data_dir", str(tmp_path / "nowhere"), "--dry-run"), "no such directory")
    os.remove(os.path.join(wikitext_dir, "valid.txt"))
    assert_user_error(run("--data_dir", wikitext_dir, "--workdir", str(tmp_path / "w")), "no valid split")
    empty = tmp_path / "empty"
    empty.mkdir()
    for split in ("train", "valid", "test"):
        (empty / f"{split}.txt").write_text("")
    assert_user_error(run("--data_dir", str(empty), "--dry-run"), "empty")


def test_a_given_vocabulary_that_is_unreadable_or_differs(tmp_path, wikitext_dir):
    from knnlm_jax.data.vocab import Vocab

    (tmp_path / "junk.txt").write_text("no counts here\n")
    assert_user_error(run("--data_dir", wikitext_dir, "--workdir", str(tmp_path / "w"), "--vocab",
                          str(tmp_path / "junk.txt")), "--vocab", "not a readable vocabulary")
    (tmp_path / "w2").mkdir()
    Vocab.build(["a b c"]).save(str(tmp_path / "w2" / "vocab.txt"))
    Vocab.build(["a b d"]).save(str(tmp_path / "other.txt"))
    assert_user_error(run("--data_dir", wikitext_dir, "--workdir", str(tmp_path / "w2"), "--vocab",
                          str(tmp_path / "other.txt")), "already has another vocabulary")


def test_unreadable_checkpoint(tmp_path, wikitext_dir):
    work = str(tmp_path / "run")
    small = ["--set", "num_layers=1", "--set", "d_model=16", "--set", "num_heads=2", "--set", "d_ff=32",
             "--set", "tokens_per_sample=16", "--set", "batch_size=4", "--set", "eval_batch_size=4",
             "--set", "max_steps=2", "--set", "checkpoint_every=2", "--set", "eval_every=2"]
    out = run("--data_dir", wikitext_dir, "--workdir", work, "--no-progress", *small)
    assert out.returncode == 0, out.stderr
    for root, _, files in os.walk(os.path.join(work, "checkpoints")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    assert_user_error(run("--data_dir", wikitext_dir, "--workdir", work, "--no-progress", *small), "unreadable")


TOOLS = ["train", "build", "evaluate", "generate", "convert", "summary", "prepare"]


def heavy_modules_after(code: str):
    """``(completed process, the heavy modules imported)`` of ``code`` run in a fresh interpreter."""
    code += "\nprint(sorted(m for m in ('jax', 'flax', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return out, out.stdout.strip().splitlines()[-1] if out.stdout.strip() else None


def tool_code(tool: str, flag: str) -> str:
    return (f"import sys, io, contextlib; sys.argv = ['{tool}.py', '{flag}']; from knnlm_jax.cli.{tool} import main\n"
            "try:\n    with contextlib.redirect_stdout(io.StringIO()): main()\n"
            "except SystemExit as e: print(e.code)")


@pytest.mark.parametrize("tool", TOOLS)
def test_help_imports_neither_jax_nor_faiss(tool):
    """``--help`` stays fast: no JAX, no FAISS."""
    out, heavy = heavy_modules_after(tool_code(tool, "--help"))
    assert out.returncode == 0 and heavy == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("tool", TOOLS)
def test_a_bad_flag_is_refused_without_jax(tool):
    out, heavy = heavy_modules_after(tool_code(tool, "--no-such-flag"))
    assert out.stdout.split("\n")[0] == "2" and heavy == "[]" and "error:" in out.stderr, out.stdout + out.stderr


def test_importing_the_package_imports_neither_jax_nor_faiss():
    out, heavy = heavy_modules_after("import sys, knnlm_jax; assert knnlm_jax.load and knnlm_jax.KnnlmError")
    assert out.returncode == 0 and heavy == "[]", out.stdout + out.stderr


def test_the_import_layers_hold():
    """The package's layer rules (``.importlinter``): no lower layer imports a higher one; JAX and FAISS
    only where allowed."""
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(lint):
        pytest.skip("import-linter is not installed here")
    out = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "0 broken" in out.stdout, out.stdout[-3000:]


@pytest.mark.parametrize("module, line, contract", [
    ("datastore/format.py", "import knnlm_jax.cli", "Layers, top to bottom"),
    ("data/vocab.py", "import jax", "never import JAX"),
    ("evaluation/mixing.py", "import faiss", "FAISS is imported by retrieval alone"),
    ("training/loop.py", "import knnlm_jax.retrieval.knn", "Training never imports"),
    ("models/llama.py", "import knnlm_jax.datastore.format", "Models never import"),
])
def test_each_layer_rule_fails_on_its_violation(tmp_path, module, line, contract):
    """Every contract catches its cause: one wrong-way import in a copy of the package breaks it."""
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(lint):
        pytest.skip("import-linter is not installed here")
    shutil.copytree(os.path.join(ROOT, "knnlm_jax"), tmp_path / "knnlm_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path)
    path = tmp_path / "knnlm_jax" / module
    path.write_text(path.read_text() + f"\n{line}  # a wrong-way import\n")
    out = subprocess.run([lint, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    listing = " ".join(out.stdout.split("Contracts:")[0].split())  # each contract's name, then KEPT or BROKEN
    verdict = re.search(re.escape(contract) + r".*?(KEPT|BROKEN)", listing)
    assert out.returncode != 0 and verdict and verdict.group(1) == "BROKEN", out.stdout[-2000:]


def test_only_user_errors_become_one_line_and_a_bug_keeps_its_traceback(capsys):
    """Every user error derives from ``KnnlmError`` and is one line, exit 2; a plain ``ValueError`` is a bug."""
    from knnlm_jax.cli import UserError, user_errors
    from knnlm_jax.configs import ConfigError
    from knnlm_jax.core.errors import InputError, KnnlmError
    from knnlm_jax.data.corpus_error import CorpusError
    from knnlm_jax.datastore.format import DatastoreError
    from knnlm_jax.evaluation.settings import EvaluationError

    for error in (UserError, ConfigError, CorpusError, DatastoreError, EvaluationError, InputError):
        assert issubclass(error, KnnlmError)
        with pytest.raises(SystemExit) as exit_info, user_errors("tool.py"):
            raise error("bad input")
        assert exit_info.value.code == 2 and capsys.readouterr().err == "tool.py: error: bad input\n"
    with pytest.raises(ValueError, match="an internal invariant"), user_errors("tool.py"):
        raise ValueError("an internal invariant broke")
    assert capsys.readouterr().err == ""
