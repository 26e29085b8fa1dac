#!/usr/bin/env bash
# The kNN-LM with the embedded pretrained SmolLM2-135M-Instruct.
#   wt2:          datastore on WikiText-2 train; lambda and T (and the cache's) tuned on the first 100,000 of
#                 valid's 273,868 tokens (--tune-tokens: a third of the CPU time), reported on all of test per
#                 token and per word, beside the wt2 model's results/eval_wt2.json
#   shakespeare:  domain adaptation: a Tiny Shakespeare train datastore, tuned on its valid, reported on its test
# Each part builds its datastore (resumable: rerun after a kill) and reuses finished evaluation passes.
# Writes results/eval_smollm2_<part>.json.  Usage: bash benchmarks/eval_smollm2.sh [wt2] [shakespeare]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
RUN=runs/smollm2
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(shakespeare wt2)

summarise() {  # $1 part, $2 datastore, $3 extra note
  $PY - "$1" "$2" "$3" <<'PY'
import json, os, sys
from knnlm_jax.core.report import valid_without_grids, write_json

part, name, note = sys.argv[1:]
r = json.load(open(f"runs/smollm2/eval/{name}/results.json"))
keep = ("split", "corpus_name", "tokens", "words", "unit", "window", "context", "datastore", "datastore_entries",
        "index", "rows", "knn", "cache", "valid", "speed")
rows = {row["name"]: row for row in r["rows"]}
base, knn = rows["base LM"], rows["+kNN-LM"]
summary = dict(base_lm_ppl_per_token=base["ppl"], base_lm_ppl_per_word=base["word_ppl"],
               knn_lm_ppl_per_token=knn["ppl"], knn_lm_ppl_per_word=knn["word_ppl"],
               knn_lm_change_pct=knn["change_pct"], lmbda=r["knn"]["lmbda"], temperature=r["knn"]["temperature"])
for label, key in (("+cache", "cache"), ("+kNN-LM+cache", "knn_lm_cache")):
    if label in rows:
        summary[f"{key}_ppl_per_token"], summary[f"{key}_ppl_per_word"] = rows[label]["ppl"], rows[label]["word_ppl"]
result = {k: r.get(k) for k in keep}
result["valid"] = valid_without_grids(result["valid"] or {})
out = {"note": note, "summary": summary, "result": result, "examples": r["examples"],
       "model": r["model"], "datastore_manifest": r["datastore_manifest"], "config": r["config"]}
if part == "wt2" and os.path.exists("results/eval_wt2.json"):
    wt2 = json.load(open("results/eval_wt2.json"))["summary"]
    out["wt2_model_word_level"] = {k: wt2[k] for k in ("base_lm", "knn_lm_exact", "knn_lm_change_pct", "cache",
                                                       "knn_lm_cache")}
write_json(f"results/eval_smollm2_{part}.json", out, f"bash benchmarks/eval_smollm2.sh {part}")
print(json.dumps(summary, indent=2))
PY
}

for part in "${parts[@]}"; do
  case $part in
    shakespeare)
      ds=tinyshakespeare-train
      common=(--workdir $RUN --datastore $ds --corpus "$DATA/tinyshakespeare" --no-progress)
      [ -f $RUN/datastores/$ds/index.faiss ] || $PY build.py --model smollm2 "${common[@]}"
      $PY evaluate.py "${common[@]}" --split test --cache --show 5 > runs/eval_smollm2_shakespeare.log 2>&1
      summarise shakespeare $ds "SmolLM2-135M-Instruct (Q4_1 GGUF, no fine-tuning) with a datastore of Tiny Shakespeare train; lambda and T tuned on its valid"
      ;;
    wt2)
      common=(--workdir $RUN --datastore train --corpus "$DATA/wikitext-2" --no-progress)
      [ -f $RUN/datastores/train/index.faiss ] || $PY build.py --model smollm2 "${common[@]}"
      $PY evaluate.py "${common[@]}" --split test --cache --show 5 --tune-tokens 100000 > runs/eval_smollm2_wt2.log 2>&1
      summarise wt2 train "SmolLM2-135M-Instruct (Q4_1 GGUF, no fine-tuning) with a datastore of WikiText-2 train; lambda, T and the cache's parameters tuned on the first 100,000 valid tokens, test reported whole; per word: the summed subword NLL over WikiText-2's word count (words and line ends), comparable with the word-level wt2 model"
      ;;
    *) echo "unknown part $part (wt2, shakespeare)" >&2; exit 2 ;;
  esac
done
