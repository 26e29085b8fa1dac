"""The command-line tools (``train``, ``build``, ``evaluate``, ``generate``, ``convert``, ``summary``, ``prepare``) and their shared plumbing:
config selection, overrides, user-error handling. The top layer: nothing in the package imports it;
lazy imports keep ``--help`` and bad-flag refusals JAX-free."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

from knnlm_jax.configs import apply_overrides, get_config
from knnlm_jax.core.hints import command, installed, program  # noqa: F401  (the tools' hints)
from knnlm_jax.core.errors import KnnlmError


class UserError(KnnlmError):
    """An error caused by the user's input: reported as one line, no traceback."""


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "tiny", model: bool = False) -> None:
    parser.add_argument("--config", default=default, help="named config (tiny, wt2, wt103)")
    if model:
        parser.add_argument("--model", default=None, metavar="PATH",
                            help="a pretrained Llama-family LM instead of a trained run: a .gguf file, a Hugging "
                                 "Face directory (config.json, *.safetensors, tokenizer.json), or smollm2 (the "
                                 "embedded SmolLM2-135M-Instruct); its run directory is --workdir, else "
                                 "runs/<model name>, and remembers it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable); unknown keys are an error")
    parser.add_argument("--data_dir", "--data-dir", default=None,
                        help="WikiText-format directory (train/valid/test.txt or wiki.*.tokens), or a corpus "
                             "spec (tfds:NAME[/CONFIG][:SPLIT], wiki3b); default: the config's, else the embedded corpus")
    parser.add_argument("--workdir", default=None, help="run directory (default: runs/<config>)")
    parser.add_argument("--tfds-data-dir", "--tfds_data_dir", dest="tfds_data_dir", default=None, metavar="DIR",
                        help="where prepared TFDS datasets are (default: env TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    parser.add_argument("--text-feature", "--text_feature", dest="text_feature", default=None, metavar="NAME",
                        help="the text feature of tfds: corpora (default text, or what the run was trained "
                             "with); split on newlines into lines")
    parser.add_argument("--tokenize", default=None, choices=("wikitext",),
                        help="split each line's punctuation off as WikiText is (@-@, @,@, @.@), for raw text read "
                             "by a model of WikiText's vocabulary (default: as the run or datastore was made; "
                             "recorded in the manifest)")


def corpus_options(args, recorded: dict | None = None) -> dict:
    """Keyword options of :func:`corpus.read_split` / :func:`runs.split_tokens`: the flags given, else
    ``recorded`` (what the run or datastore was made with), else the defaults."""
    from knnlm_jax.datastores import corpus_options as options

    return options(args, recorded)


def check_data_dir(data_dir) -> None:
    """``--data_dir``: an existing directory or a corpus spec (``tfds:...``, ``wiki3b``, ``wiki-offline``)."""
    from knnlm_jax.runs import is_corpus_spec

    if data_dir is not None and not (os.path.isdir(data_dir) or is_corpus_spec(data_dir)):
        raise UserError(f"--data_dir {data_dir}: no such directory")


def load_config(args):
    config = get_config(args.config)
    apply_overrides(config, args.overrides)
    if args.data_dir is not None:
        check_data_dir(args.data_dir)
        config.data_dir = args.data_dir
    workdir = args.workdir or os.path.join("runs", config.name)
    return config, workdir


def run_choice(args):
    """The :class:`~knnlm_jax.api.RunChoice` of a tool's ``--workdir``, ``--config``, ``--model``, ``--set`` and
    ``--data_dir``."""
    from knnlm_jax.api import RunChoice

    return RunChoice(args.workdir, args.config, getattr(args, "model", None), tuple(args.overrides), args.data_dir)


def load_run(args):
    """``(config, workdir)`` of a trained run: ``--workdir``, else ``runs/<--config>``, else the latest run.

    The config is the run's saved one with ``--set`` overrides (which may not change the model).
    With ``--model`` it is that pretrained LM's run directory (made on first use).
    """
    return run_choice(args).resolve()


def supervised(tool: str, argv, args) -> int | None:
    """Under several processes, run this tool as a watched child (see :mod:`knnlm_jax.core.supervisor`)
    and return its exit status; ``None`` where this process is to do the work itself."""
    from knnlm_jax.core import supervisor
    from knnlm_jax.core.distributed import Launch

    launch = Launch.from_args(args)
    if supervisor.is_child() or not launch.multi:
        return None
    with user_errors(program(tool)):
        launch.check()
    return supervisor.supervise(program(tool), f"knnlm_jax.cli.{tool}", list(sys.argv[1:] if argv is None else argv),
                                launch.process_id, launch.coordinator)


@contextmanager
def user_errors(prog: str):
    """Turn user errors (:class:`~knnlm_jax.core.errors.KnnlmError`, a missing file) into one line on stderr
    and exit status 2, a failed read or write into one line too, Ctrl-C into one line and 130."""
    from knnlm_jax.core import interrupts
    from knnlm_jax.core.distributed import leave

    try:
        with interrupts.handled(prog):
            yield
    except (KnnlmError, FileNotFoundError) as err:  # anything else is a bug: its traceback stays
        if getattr(err, "threads_stuck", False):  # a failed orbax write or read leaves threads that never end
            sys.stdout.flush()
            sys.stderr.flush()
            own = getattr(err, "stderr_fd", None) or os.dup(2)  # fd 2 may already be silenced
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # their dying words would follow ours: silence them
            os.write(own, f"{prog}: error: {err}\n".encode())
            os._exit(2)
        print(f"{prog}: error: {err}", file=sys.stderr)
        leave(2)
    except OSError as err:  # a read-only directory, a full disk, a file where a directory goes
        what = f"{err.strerror} ({err.filename})" if err.strerror and err.filename else (err.strerror or str(err))
        print(f"{prog}: error: cannot write or read: {what}; fix it and run the same command again "
              "(finished work is kept)", file=sys.stderr)
        leave(2)
    except KeyboardInterrupt:  # everything below has cleaned up; a normal shutdown could crash mid-compile
        interrupts.exit_interrupted(prog)
    except Exception as err:  # a bug: its traceback, and under several processes an exit the peers notice
        from knnlm_jax.core.distributed import current, lost_peer

        if not current().multi:
            raise
        if peer := lost_peer(err):
            print(f"{prog}: error: process {current().index}: {peer}; run the same commands again to resume",
                  file=sys.stderr)
            leave(3)
        import traceback

        traceback.print_exc()
        leave(1)
