#!/usr/bin/env bash
# Kill -9 a shortened wt2 run mid-way, rerun the same command, and compare with an
# uninterrupted run of the same config. Writes results/kill_resume_wt2.json.
# Usage: bash benchmarks/kill_resume.sh [kill-after-seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/wikitext-2}
KILL_AFTER=${1:-150}
SHORT=(--set max_steps=100 --set checkpoint_every=25 --set eval_every=50 --set warmup_steps=20
       --set max_eval_tokens=30000)
cmd=($PY train.py --config wt2 --data_dir "$DATA" --no-progress "${SHORT[@]}")
rm -rf runs/wt2-ref runs/wt2-kill

"${cmd[@]}" --workdir runs/wt2-ref > runs/wt2-ref.log 2>&1
"${cmd[@]}" --workdir runs/wt2-kill > runs/wt2-kill.1.log 2>&1 &
pid=$!
sleep "$KILL_AFTER"
killed_at=$(grep -c '"loss"' runs/wt2-kill/metrics.jsonl || true)
kill -9 "$pid" || true
wait "$pid" 2>/dev/null || true
"${cmd[@]}" --workdir runs/wt2-kill > runs/wt2-kill.2.log 2>&1

$PY - "$killed_at" <<'PY'
import json, sys
from knnlm_jax.core.report import read_jsonl, write_json
ref = [r for r in read_jsonl("runs/wt2-ref/metrics.jsonl") if r.get("event") == "end"][-1]
kill = [r for r in read_jsonl("runs/wt2-kill/metrics.jsonl") if r.get("event") == "end"][-1]
resumed = [l for l in open("runs/wt2-kill.2.log") if l.startswith("resumed from step")]
rel = abs(kill["valid_ppl"] - ref["valid_ppl"]) / ref["valid_ppl"]
out = {"shortened_with": "--set max_steps=100 --set checkpoint_every=25 --set eval_every=50 --set warmup_steps=20 --set max_eval_tokens=30000",
       "log_records_before_kill": int(sys.argv[1]), "resume_message": resumed[0].strip() if resumed else None,
       "uninterrupted_valid_ppl": ref["valid_ppl"], "killed_and_resumed_valid_ppl": kill["valid_ppl"],
       "relative_difference": rel}
write_json("results/kill_resume_wt2.json", out, "bash benchmarks/kill_resume.sh")
print(json.dumps(out, indent=2))
PY
