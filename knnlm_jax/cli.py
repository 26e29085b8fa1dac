"""Shared command-line plumbing: config selection, overrides, user-error handling."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

from knnlm_jax.configs import ConfigError, apply_overrides, get_config


class UserError(Exception):
    """An error caused by the user's input: reported as one line, no traceback."""


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "tiny") -> None:
    parser.add_argument("--config", default=default, help="named config (tiny, wt2, wt103)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable); unknown keys are an error")
    parser.add_argument("--data_dir", "--data-dir", default=None,
                        help="WikiText-format directory (train/valid/test.txt or wiki.*.tokens); "
                             "default: the config's, else the embedded corpus")
    parser.add_argument("--workdir", default=None, help="run directory (default: runs/<config>)")


def load_config(args):
    config = get_config(args.config)
    apply_overrides(config, args.overrides)
    if args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            raise UserError(f"--data_dir {args.data_dir}: no such directory")
        config.data_dir = args.data_dir
    workdir = args.workdir or os.path.join("runs", config.name)
    return config, workdir


def load_run(args):
    """``(config, workdir)`` of a trained run: ``--workdir``, else ``runs/<--config>``, else the latest run.

    The config is the run's saved one with ``--set`` overrides (which may not change the model).
    """
    from knnlm_jax import runs

    if args.workdir:
        workdir = args.workdir
    elif args.config:
        workdir = os.path.join(runs.RUNS_ROOT, args.config)
    else:
        workdir = runs.latest_run()
    return runs.run_config(workdir, args.overrides), workdir


@contextmanager
def user_errors(prog: str):
    """Turn user errors into one line on stderr and exit status 2."""
    from knnlm_jax.checkpoint import CheckpointError
    from knnlm_jax.corpus import CorpusError

    try:
        yield
    except (UserError, ConfigError, CorpusError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
