#!/usr/bin/env python
"""``python evaluate.py``: the same as the installed ``knnlm-evaluate`` (see knnlm_jax/cli/evaluate.py)."""

import sys

from knnlm_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
