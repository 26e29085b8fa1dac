#!/usr/bin/env python
"""``python train.py``: the same as the installed ``knnlm-train`` (see knnlm_jax/commands/train.py)."""

import sys

from knnlm_jax.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
