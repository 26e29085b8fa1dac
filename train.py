#!/usr/bin/env python
"""``python train.py``: the same as the installed ``knnlm-train`` (see knnlm_jax/cli/train.py)."""

import sys

from knnlm_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
