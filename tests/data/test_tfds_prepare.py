"""The prepare command: a local TFDS dataset prepared as ArrayRecord by a real subprocess, then read back."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT
from knnlm_jax.data import corpus

BUILDER = '''
import tensorflow_datasets as tfds
from etils import epath

class PrepareTfdsTest(tfds.core.GeneratorBasedBuilder):
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(["a b c\\nd e", "f g"]), "test": self._generate_examples(["h i"])}

    def _generate_examples(self, texts):
        for i, text in enumerate(texts):
            yield i, {"text": text}
'''


def prepare(*args, cwd):
    return subprocess.run([sys.executable, "-m", "knnlm_jax.cli.prepare", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))


def test_a_local_dataset_is_prepared_as_array_record_and_read_back(tmp_path):
    code = tmp_path / "builder.py"
    code.write_text(BUILDER)
    data_dir = tmp_path / "tfds"
    out = prepare("tfds:prepare_tfds_test", "--tfds-data-dir", str(data_dir), "--builder-code", str(code), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "prepared prepare_tfds_test" in out.stdout and "train 2" in out.stdout and "test 1" in out.stdout
    assert list((data_dir / "prepare_tfds_test" / "1.0.0").glob("*.array_record*"))
    assert "tensorflow" not in sys.modules  # this process read it back without TensorFlow too
    lines = list(corpus.read_split("tfds:prepare_tfds_test", "train", tfds_data_dir=str(data_dir),
                                   cache_dir=str(tmp_path / "fp")).lines())
    assert lines == ["a b c", "d e", "f g"]
    again = prepare("tfds:prepare_tfds_test", "--tfds-data-dir", str(data_dir), "--builder-code", str(code),
                    cwd=tmp_path)  # already prepared: nothing to do, same answer
    assert again.returncode == 0 and "train 2" in again.stdout


@pytest.mark.parametrize("spec, fragment", [
    ("tfds:no_such_dataset_here", "TFDS has no dataset no_such_dataset_here"),
    ("tfds:prepare_tfds_test:train", "a dataset is prepared whole; drop :train"),
    ("nonsense", "malformed corpus spec"),
])
def test_bad_input_is_one_line(tmp_path, spec, fragment):
    out = prepare(spec, "--tfds-data-dir", str(tmp_path), cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and fragment in lines[0], out.stderr


def test_wiki3b_names_its_missing_extras_without_network(tmp_path):
    import importlib.util

    if importlib.util.find_spec("apache_beam") is not None:
        pytest.skip("apache-beam is installed here")
    out = prepare("wiki3b", "--tfds-data-dir", str(tmp_path), cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "preparing wikipedia/20230601.en needs apache-beam" in lines[0] and "-m pip install" in lines[0]
