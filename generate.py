#!/usr/bin/env python
"""``python generate.py``: the same as the installed ``knnlm-generate`` (see knnlm_jax/commands/generate.py)."""

import sys

from knnlm_jax.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
