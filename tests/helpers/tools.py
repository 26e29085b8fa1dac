"""The command-line tools (``train.py``, ``build.py``, ``evaluate.py``, ...) run as subprocesses, and their checks."""

import json
import os
import subprocess
import sys

from helpers import ROOT


def tool(name, *args, cwd=None, devices=1, wait=True, timeout=300):
    """``python <name>.py --no-progress *args`` on ``devices`` CPU devices: its ``CompletedProcess``, or its
    ``Popen`` (pipes open) when not ``wait``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    argv = [sys.executable, os.path.join(ROOT, f"{name}.py"), "--no-progress", *args]
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def build_py(*args, cwd, devices=1):
    """``python build.py --no-progress *args`` in ``cwd``."""
    return tool("build", *args, cwd=cwd, devices=devices)


def manifest(directory):
    """A datastore's ``manifest.json``."""
    with open(os.path.join(directory, "manifest.json")) as f:
        return json.load(f)


def assert_user_error(out, *fragments):
    """A refused command: non-zero exit, one line on stderr holding every fragment, no traceback."""
    assert out.returncode != 0
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
