"""How the user ran a tool, so that hints print a command that works when pasted (no JAX)."""

from __future__ import annotations

import os
import sys


def installed() -> bool:
    """Whether this process runs an installed console command (``knnlm-train``, ...), not ``python train.py``."""
    return os.path.basename(sys.argv[0] if sys.argv else "").startswith("knnlm-")


def command(name: str) -> str:
    """How to run tool ``name`` (train, build, evaluate) the way this process was run, for hints."""
    return f"knnlm-{name}" if installed() else f"python {name}.py"


def program(name: str) -> str:
    """The name errors are prefixed with: ``knnlm-NAME`` or ``NAME.py``."""
    return f"knnlm-{name}" if installed() else f"{name}.py"
