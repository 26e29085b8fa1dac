#!/usr/bin/env bash
# The kNN-LM on WikiText-2: the wt2 model with its training-set datastore,
# lambda and T (and the cache's lambda_c and theta) tuned on valid, reported on test; exact
# re-ranking and FAISS's approximate distances, each tuned on its own. Needs runs/wt2 with an
# indexed datastore "train" (python build.py --workdir runs/wt2 --data_dir ../shared/data/wikitext-2).
# Writes results/eval_wt2.json and copies the sweep plots to results/.  Usage: bash benchmarks/eval_wt2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/wikitext-2}
common=(--workdir runs/wt2 --data_dir "$DATA" --datastore train --split test --no-progress --recompute)
$PY evaluate.py "${common[@]}" --cache --show 5 --out runs/wt2/eval/train-exact > runs/eval_wt2_exact.log 2>&1
$PY evaluate.py "${common[@]}" --approximate --out runs/wt2/eval/train-approx > runs/eval_wt2_approx.log 2>&1
cp runs/wt2/eval/train-exact/sweep_k.png results/eval_wt2_sweep_k.png
cp runs/wt2/eval/train-exact/sweep_lambda.png results/eval_wt2_sweep_lambda.png

$PY - <<'PY'
import json
from knnlm_jax.core.report import write_json

exact = json.load(open("runs/wt2/eval/train-exact/results.json"))
approx = json.load(open("runs/wt2/eval/train-approx/results.json"))
keep = ("split", "tokens", "window", "context", "datastore", "datastore_entries", "index", "rows", "knn", "cache",
        "valid", "speed", "not_found", "self_dropped")
out = {"exact": {k: exact.get(k) for k in keep}, "approximate": {k: approx.get(k) for k in keep},
       "sweeps_exact": exact["sweeps"], "examples_exact": exact["examples"],
       "plots": ["results/eval_wt2_sweep_k.png", "results/eval_wt2_sweep_lambda.png"],
       "model": exact["model"], "datastore_manifest": exact["datastore_manifest"], "config": exact["config"]}
table = {r["name"]: r["ppl"] for r in exact["rows"]}
table_approx = {r["name"]: r["ppl"] for r in approx["rows"]}
out["summary"] = {"base_lm": table["base LM"], "knn_lm_exact": table["+kNN-LM"],
                  "knn_lm_approximate": table_approx["+kNN-LM"], "cache": table.get("+cache"),
                  "knn_lm_cache": table.get("+kNN-LM+cache"),
                  "knn_lm_change_pct": 100 * (table["+kNN-LM"] - table["base LM"]) / table["base LM"]}
write_json("results/eval_wt2.json", out, "bash benchmarks/eval_wt2.sh")
print(json.dumps(out["summary"], indent=2))
PY
