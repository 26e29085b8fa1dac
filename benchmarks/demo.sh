#!/usr/bin/env bash
# The README's demo numbers: `make demo` from a fresh clone of HEAD (new venv, pip's cache as it is),
# timed as a whole, then its run, datastore and evaluation summarised into results/demo.json.
# Usage: bash benchmarks/demo.sh   (about 12 minutes on a 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone -q "$ROOT" "$tmp/demo"
commit=$(git -C "$tmp/demo" rev-parse --short HEAD)
start=$(date +%s.%N)
(cd "$tmp/demo" && make demo) > "$tmp/demo.log" 2>&1 || { tail -20 "$tmp/demo.log"; exit 1; }
end=$(date +%s.%N)

SECONDS_ALL=$(echo "$end - $start" | bc) RUN="$tmp/demo/runs/demo" COMMIT="$commit" LOG="$tmp/demo.log" \
  $PY - <<'PY'
import json
import os

from knnlm_jax.core.report import summarize_training, write_json

run = os.environ["RUN"]
training = summarize_training(run)
final = training["final"]
with open(os.path.join(run, "datastores", "train", "manifest.json")) as f:
    manifest = json.load(f)
with open(os.path.join(run, "eval", "train", "results.json")) as f:
    results = json.load(f)
payload = dict(
    commit=os.environ["COMMIT"], seconds_total=float(os.environ["SECONDS_ALL"]),
    note="make demo in a fresh clone: venv creation and pip install (warm pip cache) included",
    training=dict(config="tiny", steps=final["steps"], parameters=final["parameters"],
                  valid_ppl=final["valid_ppl"], unigram_valid_ppl=final["unigram_valid_ppl"],
                  minutes=training["curve"][-1]["minutes"] if training["curve"] else None),
    datastore=dict(entries=manifest["num_entries"], index=manifest["index"]["factory"],
                   index_seconds=manifest["index"].get("seconds")),
    evaluation=dict(split=results["split"], tokens=results["tokens"], rows=results["rows"], knn=results["knn"],
                    cache=results["cache"], valid=results["valid"] and {k: v for k, v in results["valid"].items()
                                                                        if k in ("base_ppl", "tokens")}),
    log_tail=open(os.environ["LOG"]).read().splitlines()[-25:],
)
write_json("results/demo.json", payload, "bash benchmarks/demo.sh")
print(json.dumps({k: payload[k] for k in ("seconds_total", "training", "datastore")}, indent=2))
for row in results["rows"]:
    print(f"{row['name']:>16} {row['ppl']:10.2f} {row['change_pct']:+.1f}%")
PY
