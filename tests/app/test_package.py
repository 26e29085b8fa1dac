"""The pip package: ``pip install .`` gives ``knnlm_jax`` and the console commands, which run the demo's steps.

The package is installed (no dependencies: this environment has them) under a temporary
prefix and used from another directory, so nothing is imported from the checkout.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

from helpers import ROOT

SMALL = ["--set", "num_layers=1", "--set", "d_model=16", "--set", "num_heads=2", "--set", "d_ff=32",
         "--set", "cutoffs=8,20", "--set", "tokens_per_sample=16", "--set", "batch_size=4",
         "--set", "eval_batch_size=4", "--set", "max_steps=4", "--set", "warmup_steps=2",
         "--set", "checkpoint_every=2", "--set", "eval_every=2"]


def requirement_names(lines):
    return [re.split(r"[<>=\[ ;]", line.strip(), maxsplit=1)[0].lower().replace("_", "-") for line in lines]


def test_pyproject_dependencies_are_the_runtime_requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    runtime = [line for line in lines if line and line.split("=")[0].split(">")[0] not in
               ("pytest", "pytest-xdist", "setuptools", "selenium", "import-linter")]
    assert sorted(project["dependencies"]) == sorted(runtime)
    assert set(requirement_names(project["optional-dependencies"]["test"])) == {"pytest", "pytest-xdist", "selenium",
                                                                                 "import-linter"}
    assert set(project["scripts"]) == {"knnlm-train", "knnlm-build", "knnlm-evaluate", "knnlm-generate",
                                       "knnlm-convert-fairseq", "knnlm-summary", "knnlm-prepare"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    source = tmp_path_factory.mktemp("source")  # what the package is made of, copied: no build files in the checkout
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
    shutil.copytree(os.path.join(ROOT, "knnlm_jax"), source / "knnlm_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    prefix = tmp_path_factory.mktemp("prefix")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-cache-dir", "--prefix", str(prefix), str(source)], capture_output=True, text=True,
                         timeout=300, cwd=str(prefix))
    assert out.returncode == 0, out.stderr
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    env = dict(os.environ, PYTHONPATH=site, PATH=os.path.join(prefix, "bin") + os.pathsep + os.environ["PATH"],
               JAX_PLATFORMS="cpu")
    return dict(prefix=str(prefix), site=site, env=env)


def run(installed, cwd, *args, timeout=300):
    return subprocess.run(list(args), capture_output=True, text=True, env=installed["env"], cwd=str(cwd),
                          timeout=timeout)


def test_the_installed_package_and_commands_run_the_demo_steps(installed, tmp_path, wikitext_dir):
    out = run(installed, tmp_path, sys.executable, "-c", "import knnlm_jax, os; print(knnlm_jax.__file__); "
              "print(os.path.isfile(os.path.join(os.path.dirname(knnlm_jax.__file__), 'data', 'wt103_eval_titles.txt')))")
    path, data = out.stdout.split()
    assert path.startswith(installed["site"]) and data == "True", out.stderr  # not the checkout; data shipped
    helps = {name: subprocess.Popen([f"knnlm-{name}", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=installed["env"], cwd=str(tmp_path))
             for name in ("train", "build", "evaluate", "generate", "convert-fairseq", "summary")}  # only import, print
    for name, proc in helps.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0 and stdout.startswith(f"usage: knnlm-{name}"), stderr
    work = str(tmp_path / "run")
    steps = [("knnlm-train", "--data_dir", wikitext_dir, "--workdir", work, "--no-progress", *SMALL),
             ("knnlm-build", "--workdir", work, "--no-progress"),
             ("knnlm-evaluate", "--workdir", work, "--datastore", "train", "--split", "test", "--cache",
              "--no-progress")]
    for step in steps:
        out = run(installed, tmp_path, *step)
        assert out.returncode == 0, (step[0], out.stderr[-2000:])
    assert "+kNN-LM+cache" in out.stdout
    # errors and hints name the installed commands
    out = run(installed, tmp_path, "knnlm-evaluate", "--workdir", work, "--datastore", "nope")
    assert out.returncode == 2 and out.stderr.startswith("knnlm-evaluate: error:"), out.stderr
    assert f"knnlm-build --workdir {work} --datastore nope" in out.stderr
