#!/usr/bin/env bash
# Kill -9 the WikiText-2 train datastore build mid-way, rerun the same command, and compare the
# sha256 of keys.npy / vals.npy with an uninterrupted build.
# Needs a trained runs/wt2 and its uninterrupted datastore "train" (python build.py --workdir runs/wt2 --no-index).
# Writes results/build_kill_resume_wt2.json.  Usage: bash benchmarks/kill_resume_build.sh [kill-after-seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/wikitext-2}
KILL_AFTER=${1:-240}
REF=runs/wt2/datastores/train
NAME=killtest
cmd=($PY build.py --workdir runs/wt2 --data_dir "$DATA" --datastore "$NAME" --no-index --no-progress)
rm -rf "runs/wt2/datastores/$NAME"

"${cmd[@]}" > runs/build_kill.1.log 2>&1 &
pid=$!
sleep "$KILL_AFTER"
kill -9 "$pid" || true
wait "$pid" 2>/dev/null || true
progress_at_kill=$($PY -c "import json; m=json.load(open('runs/wt2/datastores/$NAME/manifest.json')); print(m['progress'], m['status'])")
"${cmd[@]}" > runs/build_kill.2.log 2>&1

$PY - "$progress_at_kill" "$REF" "runs/wt2/datastores/$NAME" <<'PY'
import hashlib, json, sys
from knnlm_jax.core.report import write_json

def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()

progress, status = sys.argv[1].split()
ref, killed = sys.argv[2], sys.argv[3]
resumed = [l.strip() for l in open("runs/build_kill.2.log") if l.startswith("resuming datastore")]
out = {"manifest_at_kill": {"progress": int(progress), "status": status},
       "resume_message": resumed[0] if resumed else None,
       "num_entries": json.load(open(f"{killed}/manifest.json"))["num_entries"]}
for name in ("keys.npy", "vals.npy"):
    a, b = sha(f"{ref}/{name}"), sha(f"{killed}/{name}")
    out[name] = {"uninterrupted_sha256": a, "killed_and_resumed_sha256": b, "identical": a == b}
write_json("results/build_kill_resume_wt2.json", out, "bash benchmarks/kill_resume_build.sh")
print(json.dumps(out, indent=2))
PY
