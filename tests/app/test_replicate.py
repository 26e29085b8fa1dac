"""The replication suite (benchmarks/replicate.py) at its tiny scale: it runs end to end, writes every
experiment's JSON and the report with its figures, and resumes after ``kill -9`` without redoing
finished steps."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, synthetic_lines
from helpers.llama_fixture import tiny_weights, write_gguf

pytestmark = pytest.mark.slow(2)

STRONG = ("strong", "strong_approx", "strong_ngram", "strong_domain")  # the strong LM's, each reported alone
EXPERIMENTS = ("table1", "precision", "table5", "table3", "table4", "figure7", "table3_sweep", "figure8", *STRONG)
FIGURES = ("fig2_datastore_size.png", "fig4_k.png", "fig5_lambda.png", "fig7_ngram.png", "fig_frequency.png",
           "fig_table3_sweep.png")


def test_the_suite_runs_resumes_after_kill_9_and_reports(tmp_path):
    data = tmp_path / "data"
    for i, corpus in enumerate(("wikitext-2", "tinyshakespeare", "python-docs", "ptb")):
        (data / corpus).mkdir(parents=True)
        for j, (split, n) in enumerate((("train", 300), ("valid", 30), ("test", 30))):
            (data / corpus / f"{split}.txt").write_text("\n".join(synthetic_lines(n, 10 * i + j)) + "\n")
    root, results, doc = tmp_path / "root", tmp_path / "results", tmp_path / "docs" / "RESULTS.md"
    strong = tmp_path / "strong.gguf"  # the strong LM's experiments with a tiny Llama in place of SmolLM2
    write_gguf(strong, tiny_weights())
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "replicate.py"), "--scale", "tiny", "--data", str(data),
           "--root", str(root), "--results", str(results), "--doc", str(doc), "--strong-lm", str(strong)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    marker = root / "done" / "build-wiki-train.json"
    deadline = time.time() + 300
    while not marker.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), first.communicate()[0] if first.poll() is not None else "no progress in 300 s"
    os.kill(first.pid, signal.SIGKILL)  # mid-suite: the next step has started
    first.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (root / "done").glob("*.json")}
    assert "train-wiki.json" in finished and not doc.exists()

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    for name, mtime in finished.items():  # not redone
        assert (root / "done" / name).stat().st_mtime_ns == mtime
        assert f"{name[:-5]}: done before, skipped" in second.stdout
    listing = subprocess.run(cmd + ["--list"], capture_output=True, text=True, env=env, timeout=60).stdout
    assert listing.count("done  ") == len(listing.splitlines()) >= 30

    wiki_vocab = (root / "wiki" / "vocab.txt").read_text()
    for run in ("wiki-quarter", "tinyshakespeare", "python-docs", "wiki-lm-1_16"):  # trained with train.py --vocab
        assert (root / run / "vocab.txt").read_text() == wiki_vocab

    # the evaluations whose neighbour files the report never reads keep only their results and log-probs
    for out in ("wiki/eval/table1-approx", "wiki-quarter/eval/table3", "wiki-lm-1_16/eval/table3"):
        assert (root / out / "results.json").is_file() and not list((root / out).glob("tokens-*")), out
    assert (root / "wiki" / "eval" / "table1" / "tokens-test").is_dir()  # read by the report: kept

    text = doc.read_text()
    assert "Pending" not in text and "| claim | paper | ours | ours at T = 1 | change, 95% interval | holds here |" in text
    claims = [c for name in EXPERIMENTS for c in json.loads((results / f"{name}.json").read_text())["claims"]]
    intervals = [c["interval"] for c in claims if "interval" in c]
    assert len(intervals) >= 10 and all(i["low"] <= i["change"] <= i["high"] for i in intervals)
    assert sum("t1" in c for c in claims) >= 10  # the paper's T = 1 beside the tuned T
    table1 = json.loads((results / "table1.json").read_text())["table"]
    assert table1["t1"]["lmbda"] >= 0 and [r["k"] for r in table1["k_retuned"]] == [1, 2, 4, 8]
    small = table1["k_retuned"][-1]  # k = 8 paired with the LM alone on valid, at its re-tuned λ and T
    assert abs(table1["intervals"]["small_k"]["change"] - (small["valid_ppl"] / table1["sweeps"]["k"]["base_ppl"] - 1)) < 1e-4
    assert abs(sum(b["share"] for b in table1["frequency"]) - 1) < 1e-9 and all(b["tokens"] for b in table1["frequency"])
    for name in EXPERIMENTS:
        payload = json.loads((results / f"{name}.json").read_text())
        assert payload["command"] == "python benchmarks/replicate.py --scale tiny"
        assert payload["claims"] and all(c["ours"] and isinstance(c["holds"], bool) for c in payload["claims"])
        assert payload["commands"] and all(c.startswith("python ") for c in payload["commands"])
        assert payload["setup"] in text
    sweep_table = json.loads((results / "table3_sweep.json").read_text())["table"]
    sweep, curves = sweep_table["points"], sweep_table["valid_curves"]
    assert [p["fraction"] for p in sweep] == ["1/16", "1/8", "1/4", "1/2"]
    for p, n in zip(sweep, (16, 8, 4, 2)):  # datastore entries over the LM's training tokens, the lines' share
        assert abs(p["ratio"] / n - 1) < 0.2, (p["ratio"], n)
    assert all(p["best_valid_ppl"] == min(curves[p["fraction"]]["valid_ppl"]) for p in sweep)  # its curve, committed
    # each gap paired token by token with the LM trained on all: the same test tokens, so the same change
    assert all(abs(p["interval"]["change"] - p["gap_to_all"]) < 1e-5 for p in sweep)
    for name in ("precision", "strong_approx"):  # exact and approximate paired on the same test tokens
        table = json.loads((results / f"{name}.json").read_text())["table"]
        q = table["paper_precision"]
        assert abs(table["interval"]["change"] - (q["exact"]["test_knn_ppl"] / q["approximate"]["test_knn_ppl"] - 1)) < 1e-9
    table5 = json.loads((results / "table5.json").read_text())["table"]
    worst = max(table5["rows"].values(), key=lambda r: r["knn"])  # the worst key type against the LM alone
    assert abs(table5["intervals"]["worst_vs_lm"]["change"] - (worst["knn"] / worst["base"] - 1)) < 1e-5
    for r in json.loads((results / "table4.json").read_text())["table"].values():  # both LMs alone, same tokens
        assert abs(r["intervals"]["worse"]["change"] - (r["wiki_lm"] / r["in_domain_lm"] - 1)) < 1e-5
    figure8 = json.loads((results / "figure8.json").read_text())["table"]
    assert abs(figure8["interval"]["change"] - (figure8["wiki_slice_datastore"] / figure8["memorise"]["test_ppl"] - 1)) < 1e-5
    assert figure8["memorised_train_loss"] > 0
    memorised = figure8["memorise"]
    assert 0 <= memorised["lmbda"] <= 1 and memorised["test_ppl"] <= max(memorised["wiki_test_ppl"],
                                                                         memorised["memorised_test_ppl"])
    tables = {n: json.loads((results / f"{n}.json").read_text())["table"] for n in ("strong", "strong_ngram",
                                                                                   "strong_domain")}
    assert 0 <= tables["strong_ngram"]["markup"]["tokens"] <= 1 and tables["strong"]["without_markup"]["lm"] > 1
    assert all(0 <= tables["strong_domain"][t]["lmbda"] <= 1 for t in ("t1", "wiki_t1"))  # λ at T = 1 beside
    for figure in FIGURES:
        assert (doc.parent / figure).stat().st_size > 1000 and f"]({figure})" in text

    # a function step's command, as the report shows it, reruns that step alone
    again = json.loads((results / "figure7.json").read_text())["commands"][-1]
    shown = [os.path.relpath(p, ROOT) if str(p).startswith(os.path.dirname(ROOT) + os.sep) else str(p)
             for p in (data, root, strong)]  # beside the checkout (as under /tmp): relative, as the report prints it
    assert again == (f"python benchmarks/replicate.py --scale tiny --data {shown[0]} --root {shown[1]} "
                     f"--strong-lm {shown[2]} --step ngram")
    done = {p.name: p.stat().st_mtime_ns for p in (root / "done").glob("*.json")}
    (root / "done" / "ngram.json").unlink()
    rerun = subprocess.run([sys.executable, *again.split()[1:]], capture_output=True, text=True, env=env,
                           timeout=300, cwd=ROOT)
    assert rerun.returncode == 0 and "[1/1] ngram:" in rerun.stdout, rerun.stdout + rerun.stderr
    assert {p.name for p in (root / "done").glob("*.json")} == set(done)
    assert all((root / "done" / n).stat().st_mtime_ns == t for n, t in done.items() if n != "ngram.json")
    wrong = subprocess.run(cmd + ["--step", "nope"], capture_output=True, text=True, env=env, timeout=60)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "no step nope" in wrong.stderr
    both = subprocess.run(cmd + ["--report", "--step", "ngram"], capture_output=True, text=True, env=env, timeout=60)
    assert both.returncode == 2 and "not allowed with argument --report" in both.stderr

    # a done step's per-token file gone (as an older version left it): one line naming the fix, exit 1
    saved = root / json.loads((root / "exact_vs_approximate.json").read_text())["files"]["logprobs"]
    saved.rename(saved.with_suffix(".away"))
    stale = subprocess.run(cmd + ["--report"], capture_output=True, text=True, env=env, timeout=300)
    assert stale.returncode == 1 and stale.stderr.count("\n") == 1 and "run that step again" in stale.stderr
    saved.with_suffix(".away").rename(saved)

    # one strong-LM experiment's step undone: the others are reported from the runs, it is carried; one
    # fraction of the Table 3 sweep undone: the sweep reports the fractions done and names the step left;
    # Table 1's evaluation undone: it is carried, and the sweep reads the LM trained on all from its JSON
    (root / "done" / "eval-strong-domain.json").unlink()
    (root / "done" / "eval-lm-1_2.json").unlink()
    (root / "done" / "eval-table1.json").unlink()
    written = {n: json.loads((results / f"{n}.json").read_text())["written"] for n in STRONG}
    os.utime(results / "strong.json", ns=(0, 0))
    report = subprocess.run(cmd + ["--report"], capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (results / "strong.json").stat().st_mtime_ns > 0  # rewritten from the runs
    assert {n: json.loads((results / f"{n}.json").read_text())["written"] for n in STRONG} == written
    assert "Carried from `../results/strong_domain.json`" in doc.read_text()
    assert doc.read_text().count("Carried from") == 3  # and Table 1 with the precision rows that read its run
    assert "Still to run: steps eval-lm-1_2 (run the suite again)" in doc.read_text()
    swept = json.loads((results / "table3_sweep.json").read_text())["table"]
    assert [p["fraction"] for p in swept["points"]] == ["1/16", "1/8", "1/4"]
    assert swept["lm_trained_on_all"] == table1["test"]["base LM"]
    assert swept["lm_trained_on_all_from"] == os.path.relpath(results / "table1.json", ROOT)
    assert not any("interval" in p for p in swept["points"]) and "no per-token file, so no intervals" in doc.read_text()


def benchmarks():
    """The suite's modules (``benchmarks/replicate.py`` and its report), imported as the suite imports them."""
    sys.path[:0] = [os.path.join(ROOT, "benchmarks")]
    try:
        import replicate
        import replicate_report
    finally:
        del sys.path[0]
    return replicate, replicate_report


def test_final_output_gets_no_datastore_of_its_own_when_it_is_block_output():
    replicate, _ = benchmarks()
    assert replicate.lm_config(replicate.FULL).final_norm is False  # wt2: final_output is block_output itself
    assert replicate.key_types(replicate.FULL) == replicate.KEY_TYPES[:4]
    with_norm = dataclasses.replace(replicate.FULL, lm=(*replicate.FULL.lm, "--set", "final_norm=true"))
    assert replicate.key_types(with_norm) == replicate.KEY_TYPES
    steps = [s.name for s in replicate.plan(replicate.FULL, "data", "root")]
    assert "eval-key-block_output" in steps and not any(s.endswith("final_output") for s in steps)
    steps = [s.name for s in replicate.plan(with_norm, "data", "root")]
    assert {"build-key-final_output", "eval-key-final_output"} <= set(steps)


def test_a_report_without_the_runs_keeps_the_complete_results_it_finds(tmp_path):
    replicate, replicate_report = benchmarks()
    steps = replicate.plan(replicate.TINY, "data", str(tmp_path / "root"))  # a new checkout: no step done
    results, doc = tmp_path / "results", tmp_path / "docs" / "RESULTS.md"
    replicate_report.write(str(tmp_path / "root"), steps, replicate.TINY, str(results), str(doc))
    pending = json.loads((results / "table1.json").read_text())
    assert pending["pending"] == pending["steps"] and "Carried" not in doc.read_text()

    def complete(name: str, **change) -> dict:  # the experiment as an earlier report wrote it, changed
        earlier = {k: v for k, v in json.loads((results / f"{name}.json").read_text()).items() if k != "pending"}
        earlier.update(written="2026-01-02", md=["| our row | 1.00 |"], table={"test": {"base LM": 2.0}},
                       claims=[dict(claim=f"a claim measured before ({name})", paper="p", ours="o", holds=True)])
        earlier.update(change)
        return {k: v for k, v in earlier.items() if v is not None}

    kept, table4 = complete("table1"), complete("table4")
    another_lm = [c.replace("--config tiny", "--config wt2") for c in table4["commands"]]
    assert another_lm != table4["commands"]
    written = dict(table1=kept, table5=complete("table5", scale="full"), table3=complete("table3", steps=None),
                   table4=dict(table4, commands=another_lm))
    for name, payload in written.items():
        (results / f"{name}.json").write_text(json.dumps(payload))
    replicate_report.write(str(tmp_path / "root"), steps, replicate.TINY, str(results), str(doc))
    assert json.loads((results / "table1.json").read_text()) == kept  # kept as it was
    for name in ("table5", "table3", "table4"):  # another scale's, made by steps unknown, by other commands
        assert json.loads((results / f"{name}.json").read_text())["pending"], name
    text = doc.read_text()
    assert "| a claim measured before (table1) | p | o |" in text and "| our row | 1.00 |" in text
    assert "Carried from `../results/table1.json` (written 2026-01-02): its steps train-wiki," in text
    assert text.count("Pending: steps") == len(EXPERIMENTS) - 1 - len(STRONG)  # all but table1 (strong: none here)


def test_the_report_says_when_table1_was_retrained_beside_carried_sections():
    _, replicate_report = benchmarks()

    def exps(now, then, table1_carried=False):
        return [dict(name="table1", table={"test": {"base LM": now}}, **({"carried": ["eval-table1"]}
                                                                         if table1_carried else {})),
                dict(name="table3", carried=["eval-quarter"], written="2026-12-04",
                     table={"test": {"lm_trained_on_all": then}})]

    said = " ".join(replicate_report._retrained(exps(151.2035, 151.5479)))
    assert "scores 151.20 on test, not the 151.55" in said and "(written 2026-12-04)" in said
    assert replicate_report._retrained(exps(151.5479, 151.5479)) == []  # reproduced: nothing to say
    assert replicate_report._retrained(exps(151.2035, 151.5479, table1_carried=True)) == []  # both earlier


def test_an_exact_vs_approximate_result_without_its_per_token_file_names_the_fix(tmp_path):
    _, replicate_report = benchmarks()
    older = dict(factory="IVF2048,PQ16", exact={}, approximate={})  # as the benchmark wrote it before saving them
    with pytest.raises(FileNotFoundError, match="no per-token file .*run that step again"):
        replicate_report.checks.exact_vs_approximate(str(tmp_path / "e.json"), older)
    gone = dict(older, files=dict(logprobs="e-tokens.npz"))
    with pytest.raises(FileNotFoundError, match="e-tokens.npz beside it"):
        replicate_report.checks.exact_vs_approximate(str(tmp_path / "e.json"), gone)
