"""Preparing a TFDS dataset on disk as ArrayRecord through TFDS's Python API (no TensorFlow, no JAX).

``tfds build`` (the CLI) imports TensorFlow; ``builder.download_and_prepare`` with
``file_format="array_record"`` does not, for datasets whose builder does not need it. A
dataset defined outside TFDS's catalog is registered by running its builder's file first
(``builder_code``). Beam datasets (``wikipedia``, the ``wiki3b`` corpus) run their pipeline
with Apache Beam: locally by default, or on a runner given by ``beam_options`` (e.g.
Dataflow); TFDS itself warns that some take weeks on a single machine.
"""

from __future__ import annotations

import importlib.util
import runpy
import shlex
import sys
from dataclasses import dataclass

from knnlm_jax.data.corpus_error import CorpusError
from knnlm_jax.data.tfds_source import WIKI3B, WIKI3B_DATASET, parse_spec

# what TFDS's wikipedia builder imports lazily (tensorflow_datasets/text/wikipedia.py)
WIKIPEDIA_MODULES = {"apache_beam": "apache-beam", "mwparserfromhell": "mwparserfromhell", "mwxml": "mwxml"}


@dataclass(frozen=True)
class PrepareSpec:
    """What to prepare and where: ``dataset`` (``wiki3b`` or ``tfds:NAME[/CONFIG]``), the TFDS data directory."""

    dataset: str
    data_dir: str
    builder_code: str | None = None  # a Python file defining the dataset's builder (outside TFDS's catalog)
    download_dir: str | None = None
    beam_options: str | None = None  # Beam pipeline flags, e.g. "--runner=DataflowRunner --project=P"


def dataset_name(source: str) -> str:
    """``NAME[/CONFIG]`` of ``wiki3b`` or a ``tfds:`` spec; a split in the spec is refused (all are prepared)."""
    if source == WIKI3B:
        return WIKI3B_DATASET
    spec = parse_spec(source)
    if spec.split:
        raise CorpusError(f"{source}: a dataset is prepared whole; drop :{spec.split}")
    return spec.name + (f"/{spec.config}" if spec.config else "")


def missing_extras(name: str) -> list[str]:
    """The pip packages preparing ``name`` needs that are not installed."""
    if not name.startswith("wikipedia"):
        return []
    return [pip for module, pip in WIKIPEDIA_MODULES.items() if importlib.util.find_spec(module) is None]


def prepare(spec: PrepareSpec) -> dict:
    """Prepare the dataset in ``spec.data_dir`` (nothing is done where it is already prepared); what it holds."""
    import tensorflow_datasets as tfds

    name = dataset_name(spec.dataset)
    missing = missing_extras(name)
    if missing:
        raise CorpusError(f"preparing {name} needs {', '.join(missing)}: {sys.executable} -m pip install "
                          f"{' '.join(missing)} (or pip install 'knnlm-jax[wiki3b]')")
    if spec.builder_code:
        runpy.run_path(spec.builder_code)  # defining the builder class registers it with TFDS
    try:
        builder = tfds.builder(name, data_dir=spec.data_dir, file_format="array_record")
    except tfds.core.DatasetNotFoundError as err:
        raise CorpusError(f"TFDS has no dataset {name} (give the file defining its builder with --builder-code): "
                          f"{str(err).splitlines()[0]}") from None
    options = {}
    if spec.beam_options:
        import apache_beam as beam

        options["beam_options"] = beam.options.pipeline_options.PipelineOptions(flags=shlex.split(spec.beam_options))
    config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP, **options)
    builder.download_and_prepare(download_dir=spec.download_dir, download_config=config)
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    return dict(dataset=name, directory=str(builder.data_dir), splits=splits)
