#!/usr/bin/env bash
# The wt2 model (README results): train it on WikiText-2 (about 70 minutes on a 2-core CPU; a
# finished run returns at once, a killed one resumes), then summarise the run into results/train_wt2.json.
# Usage: bash benchmarks/train_wt2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/wikitext-2}
$PY train.py --config wt2 --data_dir "$DATA" --workdir runs/wt2 --no-progress
$PY -m knnlm_jax.cli.summary runs/wt2 --out results/train_wt2.json --command "bash benchmarks/train_wt2.sh"
