"""Reports: run summaries and result JSON files (with the command and config that made them).

:func:`summarize_training` summarises a training run (``knnlm-summary RUN_DIR --out X.json``,
:mod:`knnlm_jax.cli.summary`): its config, the curve (step, tokens/s, loss, valid perplexity) and
the final metrics.
"""

from __future__ import annotations

import json
import os
import platform
import sys


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize_training(workdir: str) -> dict:
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    start = next((r for r in records if r.get("event") == "start"), None)
    end = [r for r in records if r.get("event") == "end"]
    logs = {r["step"]: r for r in records if "loss" in r and "event" not in r}
    t0 = start.get("time") if start else None
    if t0 is None:  # older runs: measure from the first timed record
        t0 = next((r["time"] for r in records if "time" in r), None)
    curve = []
    for r in records:
        if "valid_ppl" in r and "event" not in r:
            near = [s for s in logs if s <= r["step"]]
            log = logs[max(near)] if near else {}
            curve.append({"step": r["step"], "valid_ppl": r["valid_ppl"], "train_loss": log.get("loss"),
                          "tokens_per_s": log.get("tokens_per_s"),
                          "minutes": (r["time"] - t0) / 60 if t0 else None})
    tps = sorted(r["tokens_per_s"] for r in logs.values() if r.get("tokens_per_s"))
    return {
        "config": config,
        "curve": curve,
        "final": end[-1] if end else None,
        "median_tokens_per_s": tps[len(tps) // 2] if tps else None,
    }


def valid_without_grids(valid: dict) -> dict:
    """An evaluation's ``valid`` report with each tuned part's perplexity in place of its tuning grids
    (thousands of lines in a committed JSON; ``results.json`` keeps them)."""
    return {k: (v["ppl"] if isinstance(v, dict) and "ppl" in v else v) for k, v in valid.items()}


def write_json(path: str, payload: dict, command: str | None = None) -> None:
    """Write ``payload`` with the command and the machine that produced it, atomically."""
    payload = dict(payload, command=command or " ".join(sys.argv),
                   machine={"platform": platform.platform(), "cpus": os.cpu_count()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2, default=float)
    os.replace(path + ".tmp", path)
