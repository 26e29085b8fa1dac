"""The Python API: load an LM, open (or build) a datastore, score text, generate, evaluate.

    import knnlm_jax as knnlm
    lm = knnlm.load("runs/demo")
    scores = lm.score("the king of the town sang .", lm.datastore("train"))

The tools (``train.py``, ``build.py``, ``evaluate.py``, ``generate.py``) are thin layers over
these functions: the same checks run here and raise :class:`~knnlm_jax.core.errors.KnnlmError`
subclasses (a datastore built with other weights, a bad λ, ``k`` above the datastore's size).
A user's own model plugs in through :meth:`LM.from_module` (the model protocol,
:mod:`knnlm_jax.models.protocol`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from knnlm_jax import runs
from knnlm_jax.core.distributed import Launch
from knnlm_jax.core.errors import InputError
from knnlm_jax.datastore.format import DatastoreError, build_command, find_datastore
from knnlm_jax.evaluation.settings import EvaluationError, Settings, perplexity
from knnlm_jax.evaluations import CORPUS_OPTIONS, check_store, evaluate_store, settings_for, settings_for_store

DEFAULT_LAMBDA, DEFAULT_TEMPERATURE = 0.25, 1.0  # without an earlier evaluation to read them from


@dataclasses.dataclass(frozen=True)
class Store:
    """An opened datastore (checked against the model's weights) and the searcher over it."""

    datastore: object  # :class:`~knnlm_jax.datastore.format.Datastore`
    searcher: object  # :class:`~knnlm_jax.retrieval.searcher.Searcher`

    @property
    def name(self) -> str:
        return self.datastore.name

    @property
    def size(self) -> int:
        return self.datastore.size

    def retriever(self, k: int, exact: bool | None = None, nprobe: int | None = None):
        """A :class:`~knnlm_jax.datastore.retriever.Retriever` of ``k`` neighbours (exact where keys are kept)."""
        from knnlm_jax.datastore.retriever import Retriever

        exact = self.datastore.keys is not None if exact is None else exact
        if k > self.size:
            raise DatastoreError(f"k {k}: datastore {self.name} has only {self.size} entries")
        return Retriever.for_store(self.datastore, self.searcher, k, exact, nprobe)

    def close(self) -> None:
        close = getattr(self.searcher, "close", None)
        if close is not None:
            close()


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per-token log-probs of a scored text: the LM's, the kNN's and their mixture (natural log)."""

    tokens: list  # the target tokens' text
    ids: np.ndarray  # their ids
    logp_lm: np.ndarray
    logp_knn: np.ndarray | None  # None without a datastore
    logp: np.ndarray  # the mixture λ p_kNN + (1 - λ) p_LM (the LM's alone without a datastore)
    lmbda: float
    temperature: float
    files: object  # the streaming pass's :class:`~knnlm_jax.evaluation.token_files.TokenFiles` (in memory)
    vocab: object
    store: Store | None

    @property
    def perplexity(self) -> float:
        """Per token, over every target of the text (each line ends with ``</s>``)."""
        return perplexity(self.logp)

    def neighbours(self, i: int, context: int = 8) -> list[tuple]:
        """Target ``i``'s neighbours, nearest first: ``(datastore id, distance, value, datastore text)``
        where the text is the ``context`` tokens before the entry and its value in brackets, on one line
        (a subword text's newlines and the value's spaces shown as marks)."""
        if self.files.ids is None:
            return []
        vals = self.store.datastore.vals
        out = []
        for entry, dist in zip(self.files.ids[i], self.files.dists[i]):
            if entry < 0:
                continue
            value = self.vocab.words[int(vals[entry])]
            before = self.vocab.shown(vals[max(0, int(entry) - context) : int(entry)])
            out.append((int(entry), float(dist), value, f"{before} [{self.vocab.shown_token(vals[entry])}]"))
        return out


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str  # the prompt and its continuation
    steps: list  # per new token: :class:`~knnlm_jax.generation.Step`
    mixing: object  # the λ and kNN temperature it used (:class:`~knnlm_jax.generation.Mixing`)


class LM:
    """A language model ready for kNN-LM work: a run directory, its config, vocabulary and weights."""

    def __init__(self, workdir: str, config, vocab, trained):
        self.workdir, self.config, self.vocab, self.trained = workdir, config, vocab, trained

    @classmethod
    def from_module(cls, model, vocab, workdir: str, *, corpus: str, key_type: str = "ffn_input_after_ln",
                    tokens_per_sample: int = 512, batch_size: int = 1) -> "LM":
        """A user's own Flax NNX model (implementing :class:`~knnlm_jax.models.protocol.LanguageModel`)
        with its vocabulary (a :class:`~knnlm_jax.data.vocab.Vocab` or a subword one) and its corpus
        (a directory or a corpus spec); datastores, token caches and evaluations go under ``workdir``.
        Windows are ``tokens_per_sample`` long, each scored or stored token with half of one before it."""
        from knnlm_jax.configs.pretrained import get_config

        config = get_config()
        config.update(name="module", data_dir=corpus, d_model=int(model.cfg.d_model), vocab_size=len(vocab),
                      key_type=key_type, tokens_per_sample=int(tokens_per_sample), build_context=-1,
                      eval_context=-1, eval_batch_size=int(batch_size))
        os.makedirs(workdir, exist_ok=True)
        return cls(workdir, config, vocab, runs.trained_from_module(model))

    @property
    def key_type(self) -> str:
        return str(self.config.key_type)

    def scorer(self):
        from knnlm_jax.evaluation.streaming import Scorer

        return Scorer(self.trained, self.key_type, self.vocab.eos)

    def signature(self):
        return runs.signature(self.config, self.vocab, self.trained.fingerprint, self.trained.step)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of ``text``, each line followed by ``</s>`` (as a corpus is read)."""
        return np.asarray(self.vocab.encode(text.splitlines()), np.int32)

    # -- datastores

    def datastore(self, name: str, *, search: str = "auto", log=None) -> Store:
        """Open ``<workdir>/datastores/<name>``, checked against these weights; ``search``: ``auto``,
        ``merged``, ``shards`` or ``device`` (:func:`~knnlm_jax.datastore.search.open_searcher`)."""
        from knnlm_jax.core.distributed import current
        from knnlm_jax.datastore.reader import open_for_model
        from knnlm_jax.datastore.search import open_searcher

        store = open_for_model(find_datastore(self.workdir, name), self.signature(), log=log)
        if search != "device" and not store.manifest.get("index"):
            raise DatastoreError(f"datastore {store.name} has no FAISS index; index it with: "
                                 f"{build_command(store.directory, '--index-only')}")
        return Store(store, open_searcher(store, current(), mode=search))

    def build_datastore(self, name: str = "train", *, corpus: str | None = None, split: str = "train",
                        overwrite: bool = False, progress: bool = False, **options) -> Store:
        """Build (or resume) ``<workdir>/datastores/<name>`` from ``split`` of ``corpus`` (default: the
        run's) and index it, as ``build.py`` does; ``options``: more :class:`~knnlm_jax.datastores.BuildOptions`
        (e.g. ``index="IVF256,PQ16"``, ``keys="none"``)."""
        from knnlm_jax.datastores import BuildOptions, RunContext, run_build

        quiet = lambda msg: None  # noqa: E731
        run = RunContext(self.config, self.workdir, self.vocab, lambda: self.trained)
        run_build(run, BuildOptions(datastore=name, corpus=corpus, split=split, overwrite=overwrite,
                                    no_progress=not progress, say=quiet, log=quiet, **options))
        return self.datastore(name)

    # -- text

    def tuned(self, store: Store | None) -> dict:
        """λ and T tuned on valid by the last complete evaluation of ``store`` ({} if none)."""
        from knnlm_jax.evaluation.outputs import tuned

        return tuned(os.path.join(self.workdir, "eval", store.name)) if store is not None else {}

    def mixing(self, store: Store | None, lmbda: float | None, temperature: float | None):
        """λ and T as given, else the last evaluation's, else 0.25 and 1 (λ 0 without a datastore)."""
        from knnlm_jax.generation import Mixing

        found = self.tuned(store)
        if store is None:
            if lmbda:
                raise InputError(f"lambda {lmbda}: needs a datastore to retrieve from")
            lmbda = 0.0
        mixing = Mixing(found.get("lmbda", DEFAULT_LAMBDA) if lmbda is None else float(lmbda),
                        found.get("temperature", DEFAULT_TEMPERATURE) if temperature is None else float(temperature))
        mixing.check()
        return mixing

    def score(self, text: str, store: Store | None = None, *, k: int | None = None, lmbda: float | None = None,
              temperature: float | None = None, exact: bool | None = None) -> Scores:
        """Per-token log p_LM, log p_kNN and the mixture for ``text``, with each token's neighbours
        (``k``: default 1024, at most the datastore's size)."""
        from knnlm_jax.data.windows import WindowSpec
        from knnlm_jax.evaluation.mixing import knn_log_probs, mix
        from knnlm_jax.evaluation.streaming import StreamSpec, score_tokens

        mixing = self.mixing(store, lmbda, temperature)
        ids = self.encode(text)
        if not len(ids):
            raise InputError("nothing to score: the text is empty")
        retriever = store.retriever(default_k(k, store), exact) if store is not None else None
        spec = StreamSpec(WindowSpec.from_config(self.config, "eval"), int(self.config.eval_batch_size),
                          progress=False)
        files = score_tokens(self.scorer(), ids, spec, retriever)
        logp_knn = knn_log_probs(files, [mixing.temperature])[0] if retriever is not None else None
        logp = mix(files.logp_lm, logp_knn, mixing.lmbda) if retriever is not None else np.asarray(files.logp_lm)
        return Scores([self.vocab.words[int(t)] for t in ids], ids, np.asarray(files.logp_lm), logp_knn,
                      np.asarray(logp), mixing.lmbda, mixing.temperature, files, self.vocab, store)

    def prompt_ids(self, prompt: str) -> list[int]:
        """``</s>`` and the prompt's ids: a generation starts at a line start, as in training."""
        subword = hasattr(self.vocab, "encode_text")
        ids = self.vocab.encode_text(prompt) if subword else [self.vocab.index.get(w, self.vocab.unk)
                                                               for w in prompt.split()]
        if not ids:
            raise InputError("the prompt is empty: give at least one word")
        return [self.vocab.eos] + list(ids)

    def continuation(self, prompt: str, steps) -> str:
        """The prompt and the generated tokens as text (a word vocabulary's ``</s>`` as a line break)."""
        if hasattr(self.vocab, "encode_text"):
            return (prompt + self.vocab.decode([s.token for s in steps])).rstrip()
        words = " ".join("\n" if s.token == self.vocab.eos else self.vocab.words[s.token] for s in steps)
        return f"{prompt} {words.replace(' ' + chr(10) + ' ', chr(10))}".rstrip()

    def generate(self, prompt: str, store: Store | None = None, *, new_tokens: int = 30, k: int | None = None,
                 lmbda: float | None = None, temperature: float | None = None, sampling=None,
                 stop_at_line_end: bool = False, nprobe: int | None = None) -> Generation:
        """Continue ``prompt`` by up to ``new_tokens`` tokens with the LM, or the kNN-LM over ``store``.

        ``temperature`` is the kNN softmax's; ``sampling`` (:class:`~knnlm_jax.generation.Sampling`,
        default greedy) chooses each token.
        """
        from knnlm_jax.generation import Sampling, generate

        if new_tokens < 1:
            raise InputError(f"new tokens {new_tokens}: must be at least 1")
        mixing = self.mixing(store, lmbda, temperature)
        context = self.prompt_ids(prompt)
        limit = int(self.config.tokens_per_sample)
        if len(context) + new_tokens > limit:
            raise InputError(f"the prompt ({len(context) - 1} tokens) and {new_tokens} new tokens exceed the "
                             f"model's context of {limit} tokens: shorten one")
        searching = store is not None and mixing.lmbda > 0
        retriever = store.retriever(default_k(k, store), nprobe=nprobe) if searching else None
        steps = generate(self.trained, context, new_tokens, key_type=self.key_type, retriever=retriever,
                         mixing=mixing, sampling=sampling or Sampling(),
                         stop=self.vocab.eos if stop_at_line_end else None)
        return Generation(self.continuation(prompt, steps), steps, mixing)

    # -- evaluation

    def settings(self, **given) -> Settings:
        """Evaluation settings for this LM (:func:`settings_for`)."""
        return settings_for(self.config, **given)

    def evaluate(self, store: Store, split: str = "valid", *, corpus: str | None = None, out: str | None = None,
                 progress: bool = False, log=None, corpus_options: dict | None = None, **settings) -> dict:
        """Evaluate ``split`` of ``corpus`` (default: the run's) with ``store``, tuning ``auto`` parameters
        on valid, as ``evaluate.py`` does; writes ``out`` (default ``<workdir>/eval/<store>``) and
        returns the results it prints."""
        settings["k"] = default_k(settings.get("k"), store)
        return evaluate_store(self, store, split, self.settings(**settings), corpus=corpus, out=out,
                              progress=progress, log=log, corpus_options=corpus_options)


@dataclasses.dataclass(frozen=True)
class RunChoice:
    """Which LM a tool works with: ``workdir``, else ``runs/<config>``, else the latest run; or the
    pretrained ``model`` (a path or ``smollm2``) with its run directory. ``overrides``: ``KEY=VALUE``."""

    workdir: str | None = None
    config: str | None = None
    model: str | None = None
    overrides: tuple = ()
    data_dir: str | None = None

    def resolve(self):
        """``(config, workdir)``, without loading weights (no JAX)."""
        if self.data_dir is not None and not (os.path.isdir(self.data_dir) or runs.is_corpus_spec(self.data_dir)):
            raise InputError(f"--data_dir {self.data_dir}: no such directory")
        if self.model:
            workdir = self.workdir or os.path.join(runs.RUNS_ROOT, runs.model_run_name(self.model))
            runs.setup_pretrained(workdir, self.model, self.data_dir)
            return runs.run_config(workdir, self.overrides, model=self.model), workdir
        workdir = self.workdir or (os.path.join(runs.RUNS_ROOT, self.config) if self.config else runs.latest_run())
        return runs.run_config(workdir, self.overrides), workdir

    def load(self) -> LM:
        config, workdir = self.resolve()
        vocab = runs.load_vocab(workdir, config)
        return LM(workdir, config, vocab, runs.load_model(workdir, config, vocab))


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """What ``generate.py`` was asked for (``None``: the last evaluation's λ or T, else 0.25 and 1)."""

    prompt: str
    datastore: str | None = None
    new_tokens: int = 30
    k: int = 1024
    lmbda: float | None = None
    temperature: float | None = None  # the kNN softmax's
    sampling_temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_at_line_end: bool = False
    nprobe: int | None = None

    def check(self) -> None:
        if self.new_tokens < 1:
            raise InputError(f"--max-new-tokens {self.new_tokens}: must be at least 1")
        if self.k < 1:
            raise InputError(f"--k {self.k}: must be at least 1")
        if self.nprobe is not None and self.nprobe < 1:
            raise InputError(f"--nprobe {self.nprobe}: must be a positive integer")
        if self.datastore is None and self.lmbda:
            raise InputError("--lmbda needs --datastore NAME (the datastore to retrieve from)")
        if self.datastore is None and self.temperature is not None:
            raise InputError("--temperature is the kNN softmax temperature and needs --datastore NAME; the "
                             "sampling temperature is --sampling-temperature")
        if self.lmbda is not None and not 0.0 <= self.lmbda <= 1.0:
            raise InputError(f"--lmbda {self.lmbda}: must be in [0, 1]")
        if self.temperature is not None and not self.temperature > 0:
            raise InputError(f"--temperature {self.temperature}: must be positive")
        if not self.prompt.split():
            raise InputError("--prompt is empty: give at least one word")


def generate_text(choice: RunChoice, options: GenerateOptions):
    """``(LM, Generation)`` of ``generate.py``: the run's LM, alone or over ``options.datastore``."""
    from knnlm_jax.generation import Sampling

    options.check()
    sampling = Sampling(options.sampling_temperature, options.top_k, options.top_p, options.seed)
    sampling.check()
    config, workdir = choice.resolve()
    if options.datastore is not None:  # an unusable datastore is refused before the weights load
        from knnlm_jax.datastore.format import open_datastore

        vocab = runs.load_vocab(workdir, config)
        store = open_datastore(find_datastore(workdir, options.datastore), runs.signature(config, vocab))
        if not store.manifest.get("index"):
            raise DatastoreError(f"datastore {store.name} has no FAISS index; index it with: "
                                 f"{build_command(store.directory, '--index-only')}")
    lm = choice.load()
    store = lm.datastore(options.datastore, log=_stderr) if options.datastore is not None else None
    result = lm.generate(options.prompt, store, new_tokens=options.new_tokens,
                         k=min(options.k, store.size) if store is not None else None, lmbda=options.lmbda,
                         temperature=options.temperature, sampling=sampling,
                         stop_at_line_end=options.stop_at_line_end, nprobe=options.nprobe)
    return lm, result


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """What ``evaluate.py`` was asked for beyond the :class:`Settings`: which datastore and text, how to
    search it, where to write, and the multi-process launch (a :class:`~knnlm_jax.core.distributed.Launch`;
    by default one process)."""

    datastore: str
    split: str = "valid"
    corpus: str | None = None  # default: the run's corpus
    corpus_options: dict = dataclasses.field(default_factory=dict)  # tfds_data_dir, text_feature given
    search: str = "auto"  # auto | merged | shards | device
    out: str | None = None
    html_tokens: int = 2000
    progress: bool = True
    launch: Launch = Launch()


def evaluate_tool(choice: RunChoice, options: EvaluateOptions, given: dict):
    """``evaluate.py``: ``(LM, Store, results)`` on process 0 of a launch; ``None`` on the others once they
    have served its searches. ``given``: :class:`Settings` fields (``exact`` ``None``: exact where keys
    are kept). Bad input is refused before the weights load."""
    from knnlm_jax.core import distributed
    from knnlm_jax.datastore.format import open_datastore
    from knnlm_jax.datastore.search import open_searcher

    options.launch.check()
    config, workdir = choice.resolve()
    lm_settings = settings_for(config, **dict(given, exact=given.get("exact") is not False))
    if options.search == "device" and given.get("exact") is False:
        raise EvaluationError("--search device computes exact distances to the stored keys: --approximate does "
                              "not apply (drop it, or search a FAISS index with --search merged)")
    if options.html_tokens < 1:
        raise EvaluationError(f"--html-tokens {options.html_tokens}: must be at least 1")
    vocab = runs.load_vocab(workdir, config)
    datastore = open_datastore(find_datastore(workdir, options.datastore), runs.signature(config, vocab))
    settings = settings_for_store(lm_settings, datastore, given.get("exact"), options.search)
    check_store(datastore, None, settings)
    processes = distributed.initialize(options.launch)
    searcher = open_searcher(datastore, processes, mode=options.search)
    check_store(datastore, searcher, settings)
    lm = LM(workdir, config, vocab, runs.load_model(workdir, config, vocab))  # every process: restores collectively
    if not processes.is_main:  # this process's shard answers process 0's searches
        _stderr(f"process {processes.index}: served {searcher.serve()} searches")
        return None
    from knnlm_jax.datastore.reader import open_for_model

    store = Store(open_for_model(datastore.directory, lm.signature(), log=print), searcher)
    try:
        recorded = runs.corpus_options(config) if options.corpus is None else {}
        corpus_options = dict({k: v for k, v in recorded.items() if k in CORPUS_OPTIONS and v},
                              **options.corpus_options)
        results = evaluate_store(lm, store, options.split, settings, corpus=options.corpus or choice.data_dir,
                                 out=options.out, progress=options.progress, log=_stderr,
                                 corpus_options=corpus_options)
    finally:
        store.close()
    return lm, store, results


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def default_k(k: int | None, store: Store) -> int:
    """``k`` as given (checked against the datastore's size where it is used), else 1024 or the whole datastore."""
    return min(1024, store.size) if k is None else int(k)


def load(source: str, *, workdir: str | None = None, overrides=()) -> LM:
    """A trained run directory, or a pretrained LM (``smollm2``, a ``.gguf`` file, a Hugging Face
    directory) whose run directory is ``workdir`` (default ``runs/<model name>``)."""
    if runs.is_run_dir(source):
        workdir, model = source, None
    else:
        model = source
        workdir = workdir or os.path.join(runs.RUNS_ROOT, runs.model_run_name(source))
        runs.setup_pretrained(workdir, source, None)
    config = runs.run_config(workdir, overrides, model=model)
    vocab = runs.load_vocab(workdir, config)
    return LM(workdir, config, vocab, runs.load_model(workdir, config, vocab))


