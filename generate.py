#!/usr/bin/env python
"""``python generate.py``: the same as the installed ``knnlm-generate`` (see knnlm_jax/cli/generate.py)."""

import sys

from knnlm_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
