"""Reliability: rerun each bad input, interruption and concurrent writer from the command line, as a new user would.

    python benchmarks/reliability.py [--keep]

Every row runs ``train.py`` / ``build.py`` / ``evaluate.py`` as subprocesses (``sys.executable``)
in a scratch directory and records the command (a shell string to paste from the project root),
its exit code, the number of non-empty lines on stderr, the last one (the message), whether a
Python traceback was printed, and named checks of what was left on disk. A row is ``ok`` when the
behaviour stated in its ``expected`` field held:

- ``error`` rows: a non-zero exit, exactly one non-empty line on stderr, no traceback, every check true;
- ``works`` rows: exit code 0, no traceback, every check true;
- ``killed`` rows (SIGKILL): no traceback, every check true (what the process left behind).

Setup (about 2 minutes on 2 busy cores): a ``tiny`` run on a small corpus (the first 8,000 lines of
tiny shakespeare's train split; its valid/test splits as they are), its ``train`` datastore, and
a second datastore ``other`` from tiny shakespeare's test split (another entry count). Row 1 uses
the embedded corpus, as the issue's command does. Rows 7 and 8 mount tmpfs file systems (read-only,
or a few MB) and so need root; every mount is unmounted at exit. Row 8a' fills the disk with only
224 KB left when the first checkpoint starts. Writes ``results/reliability.json`` and prints a
Markdown table; exits 1 if any row is not ok. Rows 14-20 cover a stale vocabulary, generate with other weights, SIGINT and SIGKILL of an
evaluation, damaged keys at evaluation time, two builds at once, a full disk while FAISS writes and
``--search device --approximate``. Takes about 10 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from knnlm_jax.core.hashing import file_sha256  # noqa: E402
from knnlm_jax.core.report import write_json  # noqa: E402

PY = sys.executable
SHAKE = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare"))
TRACEBACK = "Traceback (most recent call last)"
EVAL_ARGS = ["--k", "16", "--max-tokens", "2000", "--no-progress"]

# run a checkpoint directory's steps through orbax (no target tree) and test every float leaf
VERIFY_CHECKPOINTS = r"""
import json, os, sys
import numpy as np, jax, orbax.checkpoint as ocp
run, out = sys.argv[1], {"restored": [], "non_finite": [], "unreadable": []}
for sub in ("checkpoints", "best"):
    d = os.path.join(run, sub)
    for step in sorted((s for s in os.listdir(d) if s.isdigit()), key=int) if os.path.isdir(d) else []:
        try:
            tree = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(d, step, "state")))
        except Exception as err:
            out["unreadable"].append(f"{sub}/{step}: {type(err).__name__}")
            continue
        out["restored"].append(f"{sub}/{step}")
        if any(np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.isfinite(np.asarray(x)).all()
               for x in jax.tree_util.tree_leaves(tree)):
            out["non_finite"].append(f"{sub}/{step}")
print(json.dumps(out))
"""


def log(msg: str) -> None:
    print(f"[reliability {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def shell(argv: list[str], cwd: str = ROOT) -> str:
    """The command as a user would paste it from the project root (the venv's python, relative)."""
    shown = [os.path.relpath(a, ROOT) if a == PY and a.startswith(ROOT + os.sep) else a for a in argv]
    line = shlex.join(shown)
    return line if cwd == ROOT else f"cd {shlex.quote(cwd)} && {line}"


class Result:
    def __init__(self, argv, cwd, rc, stdout, stderr, seconds):
        self.argv, self.cwd, self.rc, self.stdout, self.stderr, self.seconds = argv, cwd, rc, stdout, stderr, seconds
        self.lines = [line for line in stderr.splitlines() if line.strip()]

    @property
    def message(self) -> str:
        return self.lines[-1].strip() if self.lines else ""

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stdout or TRACEBACK in self.stderr

    def summary(self) -> dict:
        return dict(command=shell(self.argv, self.cwd), rc=self.rc, stderr_lines=len(self.lines),
                    message=self.message, traceback=self.traceback, seconds=round(self.seconds, 1))


def run(argv: list[str], cwd: str = ROOT, timeout: float = 300) -> Result:
    t0 = time.time()
    log(f"$ {shell(argv, cwd)}")
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        res = Result(argv, cwd, p.returncode, p.stdout, p.stderr, time.time() - t0)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        errs = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        res = Result(argv, cwd, -9, out, errs + f"\n(timed out after {timeout}s)", time.time() - t0)
    log(f"  rc={res.rc} in {res.seconds:.1f}s; {len(res.lines)} stderr line(s); last: {res.message[:160]}")
    return res


def train(*args: str) -> list[str]:
    return [PY, "train.py", *args]


def build(*args: str) -> list[str]:
    return [PY, "build.py", *args]


def evaluate(*args: str) -> list[str]:
    return [PY, "evaluate.py", *args]


def generate(*args: str) -> list[str]:
    return [PY, "generate.py", *args]


def hashes(directory: str, skip: tuple = ()) -> dict[str, str]:
    """{relative path: sha256} of every file below ``directory``, leaving out folders named in ``skip``."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            out[os.path.relpath(os.path.join(root, name), directory)] = file_sha256(os.path.join(root, name))
    return out


def wait_until(predicate, proc, limit: float = 240) -> bool:
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < limit:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def strict_json(path: str):
    with open(path) as f:
        return json.load(f, parse_constant=_refuse_constant)


def _refuse_constant(name):
    raise ValueError(f"non-strict JSON constant {name}")


def jsonl_finite(path: str) -> bool:
    """Every line of a JSON-lines file is strict JSON (no NaN, Infinity)."""
    if not os.path.isfile(path):
        return True
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    json.loads(line, parse_constant=_refuse_constant)
    except ValueError:
        return False
    return True


def listing(directory: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file below ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out


def manifest(ds_dir: str) -> dict:
    path = os.path.join(ds_dir, "manifest.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent, or caught mid-write
        return {}


def flip_middle(path: str, count: int = 64) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = f.read(count)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def copy_run(src: str, dst: str, with_checkpoints: bool = True) -> None:
    """A trained run without its datastores and evaluations (what train/build need)."""
    os.makedirs(dst, exist_ok=True)
    for name in ("config.json", "metrics.jsonl", "vocab.txt", "tokens", "best") + (("checkpoints",) if with_checkpoints
                                                                                   else ()):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            shutil.copytree(s, d)
        elif os.path.exists(s):
            shutil.copy2(s, d)


class Mounts:
    def __init__(self):
        self.points: list[str] = []

    def mount(self, point: str, options: str) -> None:
        os.makedirs(point, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "none", point], check=True)
        self.points.append(point)

    def remount(self, point: str, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", point], check=True)

    def unmount_all(self) -> None:
        for point in reversed(self.points):
            p = subprocess.run(["umount", point], capture_output=True, text=True)
            if p.returncode:
                subprocess.run(["umount", "-l", point], capture_output=True)
            log(f"unmounted {point}")
        self.points.clear()


class Rows:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, expected: str, res: Result | None, checks: dict[str, bool], *, followups=(),
            info: dict | None = None, note: str | None = None) -> dict:
        checks = {k: bool(v) for k, v in checks.items()}
        row = dict(name=name, expected=expected)
        if res is None:
            row.update(command=None, rc=None, stderr_lines=None, message=None, traceback=None)
            ok = False
        else:
            row.update({k: v for k, v in res.summary().items()})
            if expected == "error":
                ok = res.rc != 0 and len(res.lines) == 1 and not res.traceback
            elif expected == "killed":  # a SIGKILL says nothing: only what it left counts
                ok = not res.traceback
            else:
                ok = res.rc == 0 and not res.traceback
            if res.rc not in (0, None) or expected == "error":
                row["stderr"] = res.stderr[-4000:]
        ok = ok and all(checks.values())
        row.update(checks=checks, ok=ok)
        if followups:
            row["followups"] = [f.summary() if isinstance(f, Result) else f for f in followups]
        if info:
            row["info"] = info
        if note:
            row["note"] = note
        self.rows.append(row)
        log(f"row {name}: {'ok' if ok else 'NOT OK'}  checks={checks}")
        return row


def small_corpus(directory: str, lines: int = 8000) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(SHAKE, "train.txt")) as f:
        head = [next(f) for _ in range(lines)]
    with open(os.path.join(directory, "train.txt"), "w") as f:
        f.writelines(head)
    for split in ("valid", "test"):
        shutil.copy(os.path.join(SHAKE, f"{split}.txt"), os.path.join(directory, f"{split}.txt"))
    return directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "reliability.json"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    if not os.path.isdir(SHAKE):
        print(f"reliability.py: {SHAKE} is missing (tiny shakespeare)", file=sys.stderr)
        return 2
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="knnlm-reliability-")
    log(f"scratch directory {tmp}")
    mounts, rows = Mounts(), Rows()
    setup: list[dict] = []
    try:
        body(tmp, mounts, rows, setup)
    finally:
        mounts.unmount_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.time() - t_start
    write_json(args.out, dict(rows=rows.rows, setup=setup, seconds=round(total, 1),
                              ok=all(r["ok"] for r in rows.rows)), "python benchmarks/reliability.py")
    print("| row | rc | lines | message | ok |")
    print("|---|---|---|---|---|")
    for r in rows.rows:
        msg = (r["message"] or "").replace("|", "\\|")
        msg = msg if len(msg) <= 100 else msg[:97] + "..."
        print(f"| {r['name']} | {r['rc']} | {r['stderr_lines']} | {msg} | {'yes' if r['ok'] else '**no**'} |")
    print(f"\n{sum(r['ok'] for r in rows.rows)}/{len(rows.rows)} rows ok in {total:.0f}s; {args.out}")
    return 0 if all(r["ok"] for r in rows.rows) else 1


def body(tmp: str, mounts: Mounts, rows: Rows, setup: list[dict]) -> None:
    corpus = small_corpus(os.path.join(tmp, "corpus"))
    base = os.path.join(tmp, "base")
    tiny = ["--config", "tiny", "--data_dir", corpus, "--set", "max_steps=40", "--set", "eval_every=20",
            "--set", "checkpoint_every=20", "--set", "max_eval_tokens=4096", "--no-progress"]

    # ---- setup: a tiny run, its datastore, a second datastore with another entry count
    for argv in (train(*tiny, "--workdir", base), build("--workdir", base, "--no-progress"),
                 build("--workdir", base, "--datastore", "other", "--corpus", SHAKE, "--split", "test",
                       "--no-progress")):
        res = run(argv)
        setup.append(res.summary())
        if res.rc != 0:
            raise RuntimeError(f"setup failed: {shell(argv)}\n{res.stderr[-3000:]}")
    stores = os.path.join(base, "datastores")
    n_train = manifest(os.path.join(stores, "train"))["num_entries"]
    n_other = manifest(os.path.join(stores, "other"))["num_entries"]
    log(f"setup done: datastore train {n_train} entries, other {n_other}")

    row1_diverging(tmp, rows)
    row2_damaged_checkpoint(tmp, base, tiny, rows)
    row3_foreign_index(base, stores, n_train, n_other, rows)
    row4_check_damaged_keys(base, stores, rows)
    row5_lambda_one(tmp, base, rows)
    row6_failed_eval(tmp, base, rows)
    row7_read_only(tmp, base, tiny, mounts, rows)
    row8_full_disk(tmp, base, tiny, mounts, rows)
    row8b_full_disk_build(tmp, base, mounts, rows)
    row9_hint(base, stores, rows)
    row10_killed_indexing(base, stores, rows)
    row11_bad_config(tmp, tiny, rows)
    row12_batch_size(base, stores, rows)
    row13_k_nprobe(base, stores, n_train, rows)
    row14_stale_vocabulary(tmp, corpus, tiny, rows)
    row15_generate_other_weights(tmp, base, rows)
    for sig in (signal.SIGINT, signal.SIGKILL):
        row16_interrupted_evaluate(tmp, base, sig, rows)
    row17_damaged_keys_evaluate(base, stores, rows)
    row18_two_builds(base, stores, rows)
    row19_full_disk_index(tmp, base, mounts, rows)
    row20_device_approximate(base, rows)


# ------------------------------------------------------------------------------------ rows


def row1_diverging(tmp, rows):
    work = os.path.join(tmp, "diverge")
    res = run(train("--config", "tiny", "--set", "optimizer=nag", "--set", "lr=0.5", "--set", "clip_norm=0.0",
                    "--set", "max_steps=200", "--set", "checkpoint_every=20", "--workdir", work, "--no-progress"))
    verify = subprocess.run([PY, "-c", VERIFY_CHECKPOINTS, work], capture_output=True, text=True, cwd=ROOT)
    try:
        ckpts = json.loads(verify.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        ckpts = {"restored": [], "non_finite": [], "unreadable": [f"verifier failed: {verify.stderr[-300:]}"]}
    step = re.search(r"\bstep (\d+)", res.message)
    rows.add("1 diverging run (nag, lr 0.5, no clipping)", "error", res, {
        "message_names_step": step is not None,
        "metrics_jsonl_strict_json_no_nan": jsonl_finite(os.path.join(work, "metrics.jsonl")),
        "stdout_has_no_nan": not re.search(r"\bnan\b|NaN|Infinity", res.stdout, re.I),
        "no_final_json_on_stdout": not any(line.lstrip().startswith("{") for line in res.stdout.splitlines()),
        "every_checkpoint_left_restores": not ckpts["unreadable"],
        "every_checkpoint_left_finite": not ckpts["non_finite"],
    }, info=dict(diverged_at=int(step.group(1)) if step else None, checkpoints_left=ckpts["restored"],
                 corpus="embedded (the default)"))


def row2_damaged_checkpoint(tmp, base, tiny, rows):
    work = os.path.join(tmp, "damaged")
    copy_run(base, work)
    ck = os.path.join(work, "checkpoints")
    steps = sorted((int(s) for s in os.listdir(ck) if s.isdigit()))
    # a run killed between two saves: drop the last step, damage the one it must resume from
    shutil.rmtree(os.path.join(ck, str(steps[-1])))
    target = os.path.join(ck, str(steps[0]))
    files = [os.path.join(r, f) for r, _, fs in os.walk(target) for f in fs]
    largest = max(files, key=os.path.getsize)
    flip_middle(largest)
    before = listing(work)
    res = run(train(*tiny, "--workdir", work))
    after = listing(work)
    changed = sorted(p for p in after if before.get(p) != after[p] and p != "metrics.jsonl")
    new_ckpt = sorted(p for p in after if p.startswith(("checkpoints/", "best/")) and p not in before)
    # what the issue asked first: resume with a higher max_steps (refused: max_steps is part of the run's config)
    higher = run(train(*[a if a != "max_steps=40" else "max_steps=60" for a in tiny], "--workdir", work))
    rows.add("2 checkpoint with bytes flipped, resume", "error", res, {
        "message_says_damaged": "damaged" in res.message,
        "no_new_checkpoint_written": not new_ckpt,
        "no_checkpoint_or_best_file_changed": not [p for p in changed if p.startswith(("checkpoints/", "best/"))],
    }, followups=[higher], info=dict(
        damaged_file=os.path.relpath(largest, work), bytes_flipped=64, file_size=os.path.getsize(largest),
        resumes_from=steps[0], removed_later_step=steps[-1], files_changed=changed, new_checkpoint_files=new_ckpt),
        note="the rerun is the run's own command (max_steps=40) after removing the later step, so that a "
             "resume must restore the damaged step and train on; the followup shows that raising max_steps "
             "on resume is refused as a different config before any checkpoint is read")


def row3_foreign_index(base, stores, n_train, n_other, rows):
    ds = os.path.join(stores, "swapped")
    shutil.copytree(os.path.join(stores, "train"), ds)
    shutil.copy2(os.path.join(stores, "other", "index.faiss"), os.path.join(ds, "index.faiss"))
    out = os.path.join(base, "eval", "swapped")
    res = run(evaluate("--workdir", base, "--datastore", "swapped", *EVAL_ARGS))
    rows.add("3 index.faiss from another datastore", "error", res, {
        "no_results_json": not os.path.exists(os.path.join(out, "results.json")),
    }, info=dict(datastore_entries=n_train, index_entries=n_other))
    shutil.rmtree(ds)


def row4_check_damaged_keys(base, stores, rows):
    ds = os.path.join(stores, "badkeys")
    shutil.copytree(os.path.join(stores, "train"), ds)
    keys = os.path.join(ds, "keys.npy")
    size = os.path.getsize(keys)
    count = (1 << 20) if size >= 2 << 20 else size // 2
    start = (size - count) // 2
    with open(keys, "r+b") as f:
        f.seek(start)
        f.write(random.Random(10).randbytes(count))
    res = run(build("--workdir", base, "--check", "badkeys", "--no-progress"))
    rows.add("4 build --check after 1 MB of keys.npy overwritten", "error", res, {},
             info=dict(keys_bytes=size, overwritten=count, offset=start))
    shutil.rmtree(ds)


def row5_lambda_one(tmp, base, rows):
    out = os.path.join(tmp, "eval-lambda1")
    res = run(evaluate("--workdir", base, "--datastore", "train", "--lmbda", "1", "--temperature", "1",
                       "--out", out, *EVAL_ARGS))
    results, sweeps, parse_error = None, {}, None
    try:
        results = strict_json(os.path.join(out, "results.json"))
        for name in ("k", "lambda"):
            sweeps[name] = strict_json(os.path.join(out, f"sweep_{name}.json"))
    except (OSError, ValueError) as err:
        parse_error = f"{type(err).__name__}: {err}"
    values = {name: [v for v in s.get("ppl", []) if v is not None] for name, s in sweeps.items()}
    rows.add("5 evaluate --lmbda 1 --temperature 1", "works", res, {
        "results_json_strict": results is not None,
        "both_sweep_files_strict_json": len(sweeps) == 2,
        "sweeps_not_all_null": any(values.values()),
    }, info=dict(
        parse_error=parse_error,
        table={r["name"]: r["ppl"] for r in (results or {}).get("rows", [])},
        non_null_ppl={name: f"{len(values[name])}/{len(s.get('ppl', []))}" for name, s in sweeps.items()},
        knn_only_non_null=f"{sum(v is not None for v in sweeps.get('k', {}).get('knn_only_ppl', []))}/"
                          f"{len(sweeps.get('k', {}).get('knn_only_ppl', []))}"),
        note="null = an infinite perplexity (strict JSON): at lambda 1 a token none of whose k neighbours has "
             "the target gets p = 0")


def row6_failed_eval(tmp, base, rows):
    out = os.path.join(tmp, "eval-fail")
    good = run(evaluate("--workdir", base, "--datastore", "train", "--out", out, *EVAL_ARGS))
    before = listing(out)
    res = run(evaluate("--workdir", base, "--datastore", "train", "--out", out, "--retrieve-fraction", "0.5",
                       *EVAL_ARGS))
    after = listing(out)
    rows.add("6 failed evaluate after a good one (same --out)", "error", res, {
        "good_run_rc0_with_results": good.rc == 0 and "results.json" in before,
        "earlier_results_kept_unchanged": after == before,
        "no_tmp_files": not [p for p in after if ".tmp" in p or p.startswith(".next")],
    }, followups=[good], info=dict(before=sorted(before), after=sorted(after)),
        note="--retrieve-fraction 0.5 on the valid split fails inside evaluation.run; a new evaluation writes "
             "beside the last complete one and replaces it only on success; checked: the --out listing "
             "(size, mtime) before and after")


def row7_read_only(tmp, base, tiny, mounts, rows):
    ro = os.path.join(tmp, "ro")
    mounts.mount(ro, "ro,size=1m")
    res = run(train(*tiny, "--workdir", os.path.join(ro, "run")))
    rows.add("7a train.py --workdir on a read-only fs", "error", res, {
        "nothing_written": not listing(ro),
    })
    run_ro = os.path.join(tmp, "ro-run")
    mounts.mount(run_ro, "size=64m")
    copy_run(base, os.path.join(run_ro, "run"), with_checkpoints=False)
    mounts.remount(run_ro, "ro")
    res = run(build("--workdir", os.path.join(run_ro, "run"), "--no-progress"))
    rows.add("7b build.py on a read-only run dir", "error", res, {},
             note="the run (config, vocabulary, tokens, best weights) copied into a tmpfs, then remounted read-only")
    res = run(evaluate("--workdir", base, "--datastore", "train", "--out", os.path.join(ro, "eval"), *EVAL_ARGS))
    rows.add("7c evaluate.py --out on a read-only fs", "error", res, {})


def full_disk_train(name, small, size, attempts, tiny, mounts, rows, note):
    """train.py on a tmpfs of ``size``: up to ``attempts`` failing runs from an empty run dir, then the same
    command with room to spare."""
    work = os.path.join(small, "run")
    mounts.mount(small, f"size={size}")
    tries = []
    for _ in range(attempts):
        shutil.rmtree(work, ignore_errors=True)
        res = run(train(*tiny, "--workdir", work))
        tries.append(res)
        if res.rc == 0 or res.traceback or len(res.lines) != 1:
            break
    left = listing(small)
    mounts.remount(small, "size=200m")
    again = run(train(*tiny, "--workdir", work))
    error_line = next((line.strip() for line in res.lines if "train.py: error:" in line), None)
    rows.add(name, "error", res, {
        "rerun_with_space_rc0": again.rc == 0,
        "rerun_no_traceback": not again.traceback,
        "rerun_printed_final_json": any(line.startswith("{") for line in again.stdout.splitlines()),
    }, followups=[again], info=dict(
        tmpfs_size=size,
        attempts=[dict(rc=a.rc, stderr_lines=len(a.lines), traceback=a.traceback,
                       tracebacks=(a.stdout + a.stderr).count(TRACEBACK), seconds=round(a.seconds, 1)) for a in tries],
        error_line=error_line, left_after_failure=sorted(left)[:12], files_left=len(left)), note=note)
    return left


def row8_full_disk(tmp, base, tiny, mounts, rows):
    left = full_disk_train(
        "8a train.py on a full disk (2 MB tmpfs), then resumed", os.path.join(tmp, "full-train"), "2m", 1, tiny,
        mounts, rows, "2 MB: the run's vocabulary and token caches fit with about 1.7 MB to spare; the first "
        "checkpoint (best/) does not")
    # the same with little room left when the checkpoint starts (as with a larger corpus on a 2 MB disk)
    before_ckpt = sum(-(-s // 4096) * 4096 for p, (s, _) in left.items()
                      if not p.startswith(("run/best/", "run/checkpoints/")))
    size_k = before_ckpt // 1024 + 224
    full_disk_train(
        "8a' train.py on a full disk (224 KB to spare), then resumed", os.path.join(tmp, "full-train-tight"),
        f"{size_k}k", 3, tiny, mounts, rows,
        f"tmpfs of {size_k} KB: the files written before the first checkpoint plus 224 KB; the failing command "
        "is run up to 3 times from an empty run dir and the row reports the last attempt (the first that "
        "printed more than one line or a traceback, if any)")


def row8b_full_disk_build(tmp, base, mounts, rows):
    # build.py: the run fits, the keys do not
    full = os.path.join(tmp, "full-build")
    mounts.mount(full, "size=64m")
    run_dir = os.path.join(full, "run")
    copy_run(base, run_dir, with_checkpoints=False)
    used = sum(s for s, _ in listing(full).values())
    size_mb = math.ceil(used / (1 << 20)) + 4
    mounts.remount(full, f"size={size_mb}m")
    argv = build("--workdir", run_dir, "--no-progress")
    res = run(argv)
    m_fail = manifest(os.path.join(run_dir, "datastores", "train"))
    mounts.remount(full, "size=200m")
    again = run(argv)
    m = manifest(os.path.join(run_dir, "datastores", "train"))
    rows.add("8b build.py on a full disk, then resumed", "error", res, {
        "not_marked_complete_after_failure": m_fail.get("status") != "complete",
        "rerun_with_space_rc0": again.rc == 0,
        "rerun_no_traceback": not again.traceback,
        "rerun_complete_and_indexed": m.get("status") == "complete" and bool(m.get("index"))
        and os.path.isfile(os.path.join(run_dir, "datastores", "train", "index.faiss")),
    }, followups=[again], info=dict(tmpfs_mb=size_mb, run_bytes=used, status_after_failure=m_fail.get("status"),
                                    progress_after_failure=m_fail.get("progress"), entries=m.get("num_entries")))


def row9_hint(base, stores, rows):
    res = run(evaluate("--workdir", base, "--datastore", "missing", *EVAL_ARGS))
    found = re.search(r"python build\.py.*$", res.message)
    checks = {"hint_has_build_command": found is not None,
              "hint_has_workdir": bool(found) and "--workdir" in found.group(0)}
    followups, info = [], {}
    if found:
        hinted = shlex.split(found.group(0))
        info["hint"] = found.group(0)
        pasted = run([PY if a == "python" else a for a in hinted])
        followups.append(pasted)
        m = manifest(os.path.join(stores, "missing"))
        checks["pasted_command_rc0"] = pasted.rc == 0
        checks["pasted_command_no_traceback"] = not pasted.traceback
        checks["datastore_complete_and_indexed"] = m.get("status") == "complete" and bool(m.get("index"))
        shutil.rmtree(os.path.join(stores, "missing"), ignore_errors=True)
    rows.add("9 evaluate --datastore missing: paste the hint", "error", res, checks, followups=followups, info=info,
             note="the hint is run as printed (shlex.split; 'python' is this venv's) from the project root")


def row10_killed_indexing(base, stores, rows):
    name = "killidx"
    ds = os.path.join(stores, name)
    argv = build("--workdir", base, "--datastore", name, "--corpus", SHAKE, "--split", "valid", "--index", "HNSW32",
                 "--no-progress")
    log(f"$ {shell(argv)}  (killed with SIGKILL once the keys are complete, i.e. while indexing)")
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at, state = None, {}
    while proc.poll() is None and time.time() - t0 < 240:
        state = manifest(ds)
        if state.get("status") == "complete" and not state.get("index"):
            time.sleep(0.05)  # inside the indexing step (HNSW32 over ~24k keys: 0.5 s to seconds here)
            if proc.poll() is None:
                os.kill(proc.pid, 9)
                killed_at = time.time() - t0
            break
        time.sleep(0.01)
    proc.communicate()
    state = manifest(ds)
    log(f"  killed at {killed_at}s; manifest status {state.get('status')}, index {state.get('index')}")
    index_after_kill = os.path.isfile(os.path.join(ds, "index.faiss"))
    again = run(argv)
    m = manifest(ds)
    rows.add("10 killed while indexing, same command again", "works", again, {
        "killed_while_indexing": killed_at is not None and not state.get("index"),
        "index_faiss_present": os.path.isfile(os.path.join(ds, "index.faiss")),
        "manifest_records_index": (m.get("index") or {}).get("factory") == "HNSW32",
        "index_holds_every_entry": (m.get("index") or {}).get("ntotal") == m.get("num_entries"),
    }, info=dict(killed_after_s=round(killed_at, 2) if killed_at else None,
                 index_file_after_kill=index_after_kill, manifest_status_after_kill=state.get("status"),
                 rerun_stderr=again.lines[:3]),
        note="the kill: SIGKILL 0.05 s after the manifest says the keys are complete and no index is recorded")
    shutil.rmtree(ds, ignore_errors=True)


def row11_bad_config(tmp, tiny, rows):
    work = os.path.join(tmp, "badconfig")
    res = run(train(*tiny, "--set", "num_layers=-1", "--workdir", work))
    left = sorted(listing(work)) if os.path.isdir(work) else []
    again = run(train(*tiny, "--workdir", work))
    rows.add("11 train --set num_layers=-1, then corrected", "error", res, {
        "no_config_json_left": "config.json" not in left,
        "corrected_rc0": again.rc == 0,
        "corrected_no_traceback": not again.traceback,
        "corrected_wrote_config": os.path.isfile(os.path.join(work, "config.json")),
    }, followups=[again], info=dict(left_after_failure=left))


def row12_batch_size(base, stores, rows):
    res = run(build("--workdir", base, "--datastore", "bs0", "--corpus", SHAKE, "--split", "valid",
                    "--batch-size", "0", "--no-progress"))
    rows.add("12 build --batch-size 0", "error", res, {
        "no_datastore_dir_created": not os.path.exists(os.path.join(stores, "bs0")),
    })


def row13_k_nprobe(base, stores, n_train, rows):
    res = run(evaluate("--workdir", base, "--datastore", "train", "--k", str(n_train + 1), "--max-tokens", "2000",
                       "--no-progress"))
    rows.add(f"13a evaluate --k N+1 (N={n_train})", "error", res, {})
    ds = os.path.join(stores, "ivf")
    os.makedirs(ds)
    for f in ("keys.npy", "vals.npy", "manifest.json", "content.links"):
        shutil.copy2(os.path.join(stores, "other", f), os.path.join(ds, f))
    reindex = run(build("--workdir", base, "--datastore", "ivf", "--index-only", "--index", "IVF16,Flat",
                        "--no-progress"))
    m = manifest(ds)
    lists = 16
    res = run(evaluate("--workdir", base, "--datastore", "ivf", "--nprobe", str(lists + 1), *EVAL_ARGS))
    rows.add("13b evaluate --nprobe 17 on an IVF16 index", "error", res, {
        "ivf_index_built": reindex.rc == 0 and (m.get("index") or {}).get("factory") == "IVF16,Flat",
    }, followups=[reindex], note="the tiny datastores are Flat (no lists): a copy of 'other' re-indexed as IVF16,Flat")


def row14_stale_vocabulary(tmp, corpus, tiny, rows):
    from knnlm_jax.data.vocab import Vocab

    work, broken = os.path.join(tmp, "stale-vocab"), os.path.join(tmp, "corpus-no-valid")
    os.makedirs(broken)
    with open(os.path.join(SHAKE, "train.txt")) as f:  # another corpus: the last 3,000 lines of tiny shakespeare
        lines = f.readlines()[-3000:]
    with open(os.path.join(broken, "train.txt"), "w") as f:
        f.writelines(lines)
    others = [a for i, a in enumerate(tiny) if a != "--data_dir" and (i == 0 or tiny[i - 1] != "--data_dir")]
    first = run(train(*others, "--data_dir", broken, "--workdir", work))
    left = sorted(listing(work)) if os.path.isdir(work) else []
    res = run(train(*tiny, "--workdir", work))
    with open(os.path.join(corpus, "train.txt")) as f:
        fresh = Vocab.build(f.read().splitlines(), max_size=0)
    vocab = Vocab.load(os.path.join(work, "vocab.txt")) if os.path.isfile(os.path.join(work, "vocab.txt")) else None
    with open(os.path.join(corpus, "valid.txt")) as f:
        valid_words = f.read().split()
    unk = lambda v: sum(w not in v.index for w in valid_words) / max(1, len(valid_words))  # noqa: E731
    rows.add("14 a failed first training left a vocabulary; rerun with another corpus", "works", res, {
        "first_failed_in_one_line": first.rc != 0 and len(first.lines) == 1 and not first.traceback,
        "first_left_a_vocabulary": "vocab.txt" in left,
        "rerun_vocabulary_is_the_new_corpus": vocab is not None and vocab == fresh,
        "rerun_says_it_rebuilt": "rebuilding it from" in res.stderr,
    }, followups=[first], info=dict(left_after_failure=left, vocab_words=len(vocab) if vocab else None,
                                    fresh_words=len(fresh), valid_unk_rate=round(unk(vocab), 4) if vocab else None,
                                    fresh_valid_unk_rate=round(unk(fresh), 4)),
        note="the first run's corpus has no valid.txt; the rerun's vocabulary is compared with one built from "
             "the new corpus's train split")


def row15_generate_other_weights(tmp, base, rows):
    work = os.path.join(tmp, "retrained")
    copy_run(base, work)
    shutil.copytree(os.path.join(base, "datastores", "train"), os.path.join(work, "datastores", "train"))
    steps = sorted(int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit())
    shutil.rmtree(os.path.join(work, "best"))  # the weights now come from the earliest checkpoint
    for step in steps[1:]:
        shutil.rmtree(os.path.join(work, "checkpoints", str(step)))
    res = run(generate("--workdir", work, "--datastore", "train", "--prompt", "the king", "--max-new-tokens", "3"))
    rows.add("15 generate with a datastore built with other weights", "error", res, {
        "names_the_weights": "other model weights" in res.message,
    }, info=dict(checkpoint_steps=steps, weights_used=steps[0]),
        note="the run's best/ removed and later checkpoints dropped: the model loads step "
             f"{steps[0]}, the datastore was built from best/")


def row16_interrupted_evaluate(tmp, base, sig, rows):
    name = "SIGINT" if sig == signal.SIGINT else "SIGKILL"
    out = os.path.join(base, "eval", "train")  # where generate.py reads the tuned lambda and T
    good = run(evaluate("--workdir", base, "--datastore", "train", *EVAL_ARGS))
    before = hashes(out)
    argv = evaluate("--workdir", base, "--datastore", "train", "--recompute", "--lmbda", "0.5", *EVAL_ARGS)
    log(f"$ {shell(argv)}  (then {name} once it has started writing)")
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = wait_until(lambda: os.path.isdir(os.path.join(out, ".next")), proc)
    time.sleep(0.5)  # inside the evaluation pass
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate()
    res = Result(argv, ROOT, proc.returncode, stdout, stderr, time.time() - t0)
    after = hashes(out, skip=(".next",))
    with open(os.path.join(out, "results.json")) as f:
        knn = json.load(f)["knn"]
    gen = run(generate("--workdir", base, "--datastore", "train", "--prompt", "the king", "--max-new-tokens", "2",
                       "--explain", "--k", "16"))
    rows.add(f"16 evaluate interrupted by {name} after a complete one",
             "error" if sig == signal.SIGINT else "killed", res, {
                 "good_run_rc0": good.rc == 0,
                 "interrupted_while_running": started and res.rc != 0,
                 "exit_130_one_line" if sig == signal.SIGINT else "killed_by_sigkill":
                     res.rc == 130 if sig == signal.SIGINT else res.rc == -9,
                 "every_earlier_file_byte_identical": after == before,
                 "no_staging_left" if sig == signal.SIGINT else "staging_never_looks_complete":
                     not os.path.exists(os.path.join(out, ".next")) if sig == signal.SIGINT
                     else not os.path.exists(os.path.join(out, ".next", "COMMIT")),
                 "generate_uses_the_earlier_tuned_lambda_and_T": gen.rc == 0 and
                     f"lambda {knn['lmbda']:g}, kNN temperature {knn['temperature']:.4g}" in gen.stdout,
             }, followups=[good, gen], info=dict(files=len(before), lmbda=knn["lmbda"], temperature=knn["temperature"]),
             note="the second evaluation recomputes its per-token files with lambda 0.5; sha256 of every file in "
                  "<run>/eval/train before and after; then generate.py --explain shows which lambda and T it read")


def row17_damaged_keys_evaluate(base, stores, rows):
    ds = os.path.join(stores, "halfkeys")
    shutil.copytree(os.path.join(stores, "train"), ds)
    keys = os.path.join(ds, "keys.npy")
    size = os.path.getsize(keys)
    with open(keys, "r+b") as f:  # the second half of the file, same size
        f.seek(size // 2)
        f.write(random.Random(17).randbytes(size - size // 2))
    res = run(evaluate("--workdir", base, "--datastore", "halfkeys", "--out", os.path.join(base, "eval", "halfkeys"),
                       *EVAL_ARGS))
    rows.add("17 evaluate after half of keys.npy overwritten in place", "error", res, {
        "names_keys_npy": "keys.npy" in res.message,
        "no_results_json": not os.path.exists(os.path.join(base, "eval", "halfkeys", "results.json")),
    }, info=dict(keys_bytes=size, overwritten=size - size // 2))
    shutil.rmtree(ds)


def row18_two_builds(base, stores, rows):
    ds = os.path.join(stores, "twice")
    argv = build("--workdir", base, "--datastore", "twice", "--corpus", SHAKE, "--split", "valid", "--no-index",
                 "--no-progress")
    log(f"$ {shell(argv)}  (twice: the first frozen by SIGSTOP while it writes)")
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    caught = wait_until(lambda: manifest(ds).get("status") == "building", first)
    os.kill(first.pid, signal.SIGSTOP)
    second = run(argv)
    reader = run(evaluate("--workdir", base, "--datastore", "twice", *EVAL_ARGS))
    os.kill(first.pid, signal.SIGCONT)
    _, first_err = first.communicate()
    check = run(build("--workdir", base, "--check", "twice", "--no-progress"))
    rows.add("18 two build.py of one datastore at once", "error", second, {
        "first_caught_while_building": caught,
        "second_names_the_first_pid": f"PID {first.pid}" in second.message,
        "reader_says_a_build_is_running": "being built now" in reader.message and len(reader.lines) == 1,
        "first_finished_rc0": first.returncode == 0,
        "check_after_ok": check.rc == 0,
    }, followups=[reader, check], note="the first build is stopped (SIGSTOP) once its manifest says building, "
                                       "so the two overlap for certain, and continued after")
    shutil.rmtree(ds, ignore_errors=True)


def row19_full_disk_index(tmp, base, mounts, rows):
    small = os.path.join(tmp, "full-index")
    src = os.path.join(base, "datastores", "train")
    files = ("keys.npy", "vals.npy", "manifest.json", "content.links")
    need = sum(os.path.getsize(os.path.join(src, f)) for f in files if os.path.exists(os.path.join(src, f)))
    run_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(base, "best")) for f in fs)
    size = need + run_bytes + 16 * 4096 + os.path.getsize(os.path.join(src, "keys.npy")) // 2
    mounts.mount(small, f"size={size}")
    work = os.path.join(small, "run")
    os.makedirs(work)
    for name in ("config.json", "vocab.txt"):
        shutil.copy2(os.path.join(base, name), os.path.join(work, name))
    shutil.copytree(os.path.join(base, "best"), os.path.join(work, "best"))
    ds = os.path.join(work, "datastores", "train")
    os.makedirs(ds)
    for f in files[:2] + files[3:]:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy2(os.path.join(src, f), os.path.join(ds, f))
    with open(os.path.join(src, "manifest.json")) as f:
        m = dict(json.load(f), index=None)  # as a build with --no-index leaves it
    with open(os.path.join(ds, "manifest.json"), "w") as f:
        json.dump(m, f, indent=2)
    data = ("keys.npy", "vals.npy", "content.links")
    before = {f: file_sha256(os.path.join(ds, f)) for f in data}
    res = run(build("--workdir", work, "--datastore", "train", "--index-only", "--index", "Flat", "--no-progress"))
    after = manifest(ds)
    rows.add("19 full disk while FAISS writes the index", "error", res, {
        "says_no_space": "No space left on device" in res.message,
        "keys_vals_links_unchanged": {f: file_sha256(os.path.join(ds, f)) for f in data} == before,
        "manifest_same_but_its_time": {k: v for k, v in after.items() if k != "updated"}
                                      == {k: v for k, v in m.items() if k != "updated"},
        "no_partial_index_left": not any(n.startswith("index.faiss") for n in os.listdir(ds)),
    }, info=dict(tmpfs_bytes=size), note="a tmpfs with room for the run and the datastore but not its Flat index "
                                         "(float32: twice the fp16 keys)")


def row20_device_approximate(base, rows):
    res = run(evaluate("--workdir", base, "--datastore", "train", "--search", "device", "--approximate", *EVAL_ARGS))
    rows.add("20 evaluate --search device --approximate", "error", res, {
        "says_approximate_does_not_apply": "--approximate does not apply" in res.message,
    })


if __name__ == "__main__":
    sys.exit(main())
