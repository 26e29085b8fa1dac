#!/usr/bin/env python
"""``python build.py``: the same as the installed ``knnlm-build`` (see knnlm_jax/cli/build.py)."""

import sys

from knnlm_jax.cli.build import main

if __name__ == "__main__":
    sys.exit(main())
