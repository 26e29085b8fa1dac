"""TensorFlow Datasets corpora (``tfds:NAME[/CONFIG][:SPLIT]``) and the ``wiki3b`` preset, as line streams.

A dataset must already be prepared in the TFDS data directory (``--tfds-data-dir``, else env
``TFDS_DATA_DIR``, else ``~/tensorflow_datasets``); nothing is downloaded. It is opened from its
files (``tfds.builder_from_directory``, the newest prepared version), so no builder code is
needed. ArrayRecord datasets are read through ``builder.as_data_source`` (what
``tfds.data_source`` does) without TensorFlow; TFRecord datasets need TensorFlow (``tfds.load``'s
reader, files in order). Each example's text feature (``--text-feature``, default ``text``) is
split on ``"\\n"`` into lines taken verbatim (already whitespace-tokenized, WikiText style).

Splits: our ``train`` / ``valid`` / ``test`` are the dataset's ``train`` / ``validation`` (else
``valid``) / ``test``. A spec's ``:SPLIT`` (any TFDS split expression, e.g. ``train[:10%]``)
replaces the dataset split used for our ``train`` only; ``valid`` and ``test`` keep the mapping.

``wiki3b``: English Wikipedia, TFDS ``wikipedia/20230601.en`` (``title``, ``text``; split ``train``),
in the data source's index order, each article in WikiText layout (:func:`wikitext.article_lines`),
without the articles whose WikiText-tokenized title is a WikiText-103 valid or test title, and
capped at 2.87B tokens (whitespace tokens + one ``</s>`` per line): it stops before the first
article that would cross the cap. Only ``train`` exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from knnlm_jax.data.corpus_error import CorpusError
from knnlm_jax.data.wikitext import article_lines, wikitext_tokenize

TFDS_PREFIX = "tfds:"
WIKI3B = "wiki3b"
WIKI3B_DATASET = "wikipedia/20230601.en"
WIKI3B_SPLIT = "train"
WIKI3B_MAX_TOKENS = 2_870_000_000
TITLES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wt103_eval_titles.txt")
# what preparing wikipedia/20230601.en takes: 64 dump files of 20.5 GiB in all (tfds 4.9.10
# url_checksums/wikipedia.txt), an output of about the same size, apache-beam and mwparserfromhell
WIKI3B_PREPARE = ("needs network, apache-beam, mwparserfromhell and mwxml, about 45 GiB of disk (20.5 GiB of "
                  "dump downloads + about 20 GiB prepared; 6.67M articles) and a Beam pipeline that TFDS warns can "
                  "take weeks on a single machine (give a distributed runner with --beam-options)")
READ_BATCH = 256  # examples per random-access read
SPEC_HELP = "expected tfds:NAME[/CONFIG][:SPLIT], e.g. tfds:wikipedia/20230601.en or tfds:my_corpus:train[:10%]"

_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_CONFIG = re.compile(r"^[A-Za-z0-9_.\-]+$")
_SPLIT = re.compile(r"^\w+(\[[^\[\]]*\])?(\+\w+(\[[^\[\]]*\])?)*$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_HEADING = re.compile(r"^ = ([^=].*[^=]) = $")


@dataclass(frozen=True)
class TfdsSpec:
    name: str
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return TFDS_PREFIX + self.name + (f"/{self.config}" if self.config else "") + (
            f":{self.split}" if self.split else "")


def is_spec(source: str) -> bool:
    """Whether ``source`` is a catalog corpus spec rather than a path."""
    return source == WIKI3B or source.startswith(TFDS_PREFIX)


def dataset_of(source: str | None) -> str | None:
    """The TFDS dataset (``NAME[/CONFIG]``) a corpus source reads, whatever its split; ``None`` for other sources."""
    if source == WIKI3B:
        return WIKI3B_DATASET
    if not source or not source.startswith(TFDS_PREFIX):
        return None
    spec = parse_spec(source)
    return spec.name + (f"/{spec.config}" if spec.config else "")


def parse_spec(spec: str) -> TfdsSpec:
    """``tfds:NAME[/CONFIG][:SPLIT]`` -> :class:`TfdsSpec`; anything else is a :class:`CorpusError`."""
    body = spec[len(TFDS_PREFIX):] if spec.startswith(TFDS_PREFIX) else ""
    dataset, _, split = body.partition(":")
    name, _, config = dataset.partition("/")
    ok = (_NAME.match(name) and (not config or _CONFIG.match(config)) and dataset.count("/") <= 1
          and (not split or _SPLIT.match(split)) and not (body.endswith(":") or dataset.endswith("/")))
    if not ok:
        raise CorpusError(f"{spec}: malformed corpus spec; {SPEC_HELP}")
    return TfdsSpec(name, config or None, split or None)


def default_data_dir(data_dir: str | None = None) -> str:
    """``data_dir``, else env ``TFDS_DATA_DIR``, else TFDS's default ``~/tensorflow_datasets``."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def prepare_command(dataset: str, data_dir: str) -> str:
    """The command that prepares TFDS ``dataset`` (``NAME[/CONFIG]``, or ``wiki3b``) in ``data_dir``."""
    source = dataset if dataset == WIKI3B else TFDS_PREFIX + dataset
    return f"python -m knnlm_jax.cli.prepare {source} --tfds-data-dir {data_dir}"


# ---------------------------------------------------------------------------------
# finding a prepared dataset on disk


def _versions(directory: str) -> list[str]:
    """Prepared version directories (those with a dataset_info.json), newest last."""
    if not os.path.isdir(directory):
        return []
    found = [v for v in os.listdir(directory)
             if _VERSION.match(v) and os.path.isfile(os.path.join(directory, v, "dataset_info.json"))]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def _configs(root: str) -> list[str]:
    return sorted(c for c in os.listdir(root) if not _VERSION.match(c) and _versions(os.path.join(root, c)))


def prepared_datasets(data_dir: str) -> list[str]:
    """``NAME`` or ``NAME/CONFIG`` of every dataset prepared in ``data_dir``."""
    out = []
    for name in sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []:
        root = os.path.join(data_dir, name)
        if not os.path.isdir(root) or name == "downloads":
            continue
        out += [name] if _versions(root) else [f"{name}/{c}" for c in _configs(root)]
    return out


def _is_catalog_dataset(name: str) -> bool:
    import tensorflow_datasets as tfds

    return name in tfds.list_builders(with_community_datasets=False)


def find_dataset(spec: TfdsSpec, data_dir: str) -> tuple[TfdsSpec, str]:
    """``(spec with its config resolved, version directory)`` of a prepared dataset."""
    root = os.path.join(data_dir, spec.name)
    dataset = spec.name + (f"/{spec.config}" if spec.config else "")
    if not os.path.isdir(root):
        if _is_catalog_dataset(spec.name):
            raise CorpusError(f"{spec}: {dataset} is not prepared in {data_dir}; prepare it with: "
                              f"{prepare_command(dataset, data_dir)}")
        have = ", ".join(prepared_datasets(data_dir)) or "none"
        raise CorpusError(f"{spec}: no dataset {spec.name} in {data_dir} (prepared there: {have}; "
                          "--tfds-data-dir or TFDS_DATA_DIR chooses the directory)")
    if _versions(root):  # a dataset without configs
        if spec.config:
            raise CorpusError(f"{spec}: {spec.name} has no configs (use tfds:{spec.name})")
        return spec, os.path.join(root, _versions(root)[-1])
    configs = _configs(root)
    if spec.config is None:
        if len(configs) != 1:
            raise CorpusError(f"{spec}: {spec.name} has configs {', '.join(configs) or '(none prepared)'}; "
                              f"name one as tfds:{spec.name}/CONFIG")
        spec = TfdsSpec(spec.name, configs[0], spec.split)
    elif spec.config not in configs:
        hint = f"configs there: {', '.join(configs) or 'none'}"
        if _is_catalog_dataset(spec.name):
            hint += f"; prepare it with: {prepare_command(dataset, data_dir)}"
        raise CorpusError(f"{spec}: config {spec.config} of {spec.name} is not prepared in {data_dir} ({hint})")
    version_root = os.path.join(root, spec.config)
    return spec, os.path.join(version_root, _versions(version_root)[-1])


def _dir_identity(directory: str) -> str:
    """The names, sizes and mtimes of a prepared dataset's files (changes when it is re-prepared)."""
    entries = []
    for name in sorted(os.listdir(directory)):
        st = os.stat(os.path.join(directory, name))
        entries.append((name, st.st_size, st.st_mtime_ns))
    return json.dumps([os.path.abspath(directory), entries])


def _identity(*parts) -> str:
    return "tfds:" + hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------
# reading examples


class Dataset:
    """A prepared TFDS dataset opened from its directory (builder code not needed)."""

    def __init__(self, spec: TfdsSpec, directory: str):
        import tensorflow_datasets as tfds

        self.spec, self.directory = spec, directory
        try:
            self.builder = tfds.builder_from_directory(directory)
        except Exception as err:  # noqa: BLE001 (tfds raises many kinds)
            raise CorpusError(f"{spec}: cannot open {directory} ({type(err).__name__}: {err})") from None
        info = self.builder.info
        self.splits = sorted(info.splits.keys())
        self.features = sorted(info.features.keys()) if hasattr(info.features, "keys") else []
        self.file_format = getattr(info.file_format, "value", str(info.file_format))

    def check_feature(self, feature: str) -> None:
        if feature not in self.features:
            raise CorpusError(f"{self.spec}: no feature {feature!r} (features: {', '.join(self.features)}; "
                              "--text-feature chooses one)")

    def split_for(self, split: str) -> str:
        """The TFDS split expression read for our ``split``."""
        if split == "train" and self.spec.split:
            wanted = self.spec.split
        else:
            wanted = {"train": "train", "test": "test"}.get(split) or (
                "validation" if "validation" in self.splits else "valid")
        missing = [b for b in re.findall(r"(\w+)(?:\[[^\]]*\])?", wanted) if b not in self.splits]
        if missing:
            raise CorpusError(f"{self.spec}: no {missing[0]} split for our {split} split "
                              f"(splits: {', '.join(self.splits)})")
        return wanted

    def examples(self, tfds_split: str) -> Iterator[dict]:
        """Examples of ``tfds_split`` in index order, read ``READ_BATCH`` at a time."""
        if self.file_format == "array_record":
            try:
                source = self.builder.as_data_source(split=tfds_split)
            except Exception as err:  # noqa: BLE001
                raise CorpusError(f"{self.spec}: cannot read split {tfds_split!r} ({err})") from None
            for start in range(0, len(source), READ_BATCH):
                yield from source.__getitems__(list(range(start, min(start + READ_BATCH, len(source)))))
            return
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise CorpusError(
                f"{self.spec} is stored as {self.file_format}, which needs TensorFlow to read: pip install "
                f"tensorflow, or re-prepare it as ArrayRecord: {prepare_command(self._dataset(), self._data_dir())} "
                "--overwrite") from None
        import tensorflow_datasets as tfds

        yield from tfds.as_numpy(self.builder.as_dataset(split=tfds_split, shuffle_files=False))

    def _dataset(self) -> str:
        return self.spec.name + (f"/{self.spec.config}" if self.spec.config else "")

    def _data_dir(self) -> str:
        levels = 3 if self.spec.config else 2
        return os.path.abspath(os.path.join(self.directory, *[".."] * levels))


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item"):  # a numpy scalar / 0-d array
        return _text(value.item())
    return str(value)


def example_lines(examples: Iterable[dict], feature: str) -> Iterator[str]:
    """Each example's ``feature`` split on ``"\\n"``, lines taken verbatim."""
    for example in examples:
        yield from _text(example[feature]).split("\n")


def open_split(source: str, split: str, *, data_dir: str | None = None, text_feature: str = "text"):
    """``(corpus name, open_lines, identity)`` for :func:`corpus.read_split` from a catalog spec."""
    data_dir = default_data_dir(data_dir)
    if source == WIKI3B:
        return open_wiki3b(split, data_dir)
    spec, directory = find_dataset(parse_spec(source), data_dir)
    dataset = Dataset(spec, directory)
    dataset.check_feature(text_feature)
    tfds_split = dataset.split_for(split)
    identity = _identity(_dir_identity(directory), tfds_split, text_feature)
    return str(spec), lambda: example_lines(dataset.examples(tfds_split), text_feature), identity


# ---------------------------------------------------------------------------------
# wiki3b


def wt103_titles(directory: str) -> list[str]:
    """Sorted titles of the top-level `` = Title = `` headings of a WikiText-103 dir's valid and test splits."""
    titles = set()
    for split in ("valid", "test"):
        for name in (f"{split}.txt", f"wiki.{split}.tokens"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    lines = [line.rstrip("\n") for line in f]
                # a heading stands between blank lines (a formula line `` = 1 rad / s ... = `` does not)
                titles.update(m.group(1) for i, m in enumerate(map(_HEADING.match, lines))
                              if m and (i == 0 or not lines[i - 1].strip())
                              and (i + 1 == len(lines) or not lines[i + 1].strip()))
                break
    return sorted(titles)


def eval_titles(path: str = TITLES_FILE) -> frozenset[str]:
    """The WikiText-103 valid + test titles shipped with the package (comment lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return frozenset(line.rstrip("\n") for line in f if line.strip() and not line.startswith("#"))


def capped_articles(examples: Iterable[dict], excluded_titles, max_tokens: int) -> Iterator[list[str]]:
    """Articles as WikiText lines, in order, skipping excluded titles, stopping before the cap is crossed."""
    total = 0
    for example in examples:
        title = _text(example["title"])
        if wikitext_tokenize(title) in excluded_titles:
            continue
        lines = article_lines(title, _text(example["text"]))
        n = sum(len(line.split()) + 1 for line in lines)
        if total + n > max_tokens:
            return
        total += n
        yield lines


def open_wiki3b(split: str, data_dir: str | None = None, *, dataset: str | None = None,
                max_tokens: int | None = None, titles_path: str | None = None):
    """``(name, open_lines, identity)`` of the ``wiki3b`` preset; ``dataset``, cap and titles injectable."""
    dataset = dataset or WIKI3B_DATASET
    max_tokens = WIKI3B_MAX_TOKENS if max_tokens is None else max_tokens
    titles_path = titles_path or TITLES_FILE
    if split != "train":
        raise CorpusError(f"{WIKI3B} has only a train split (a datastore corpus); evaluation text comes from "
                          "the run's own corpus")
    data_dir = default_data_dir(data_dir)
    try:
        spec, directory = find_dataset(parse_spec(TFDS_PREFIX + dataset), data_dir)
    except CorpusError:
        raise CorpusError(f"{WIKI3B} needs TFDS {dataset}, not prepared in {data_dir}; preparing it {WIKI3B_PREPARE}: "
                          f"{prepare_command(WIKI3B, data_dir)}") from None
    source = Dataset(spec, directory)
    for feature in ("title", "text"):
        source.check_feature(feature)
    tfds_split = spec.split or WIKI3B_SPLIT
    if tfds_split not in source.splits:
        raise CorpusError(f"{WIKI3B}: {spec} has no {tfds_split} split (splits: {', '.join(source.splits)})")
    titles = eval_titles(titles_path)
    identity = _identity(WIKI3B, _dir_identity(directory), tfds_split, max_tokens,
                         hashlib.sha256("\n".join(sorted(titles)).encode("utf-8")).hexdigest())

    def open_lines() -> Iterator[str]:
        for lines in capped_articles(source.examples(tfds_split), titles, max_tokens):
            yield from lines

    return WIKI3B, open_lines, identity
