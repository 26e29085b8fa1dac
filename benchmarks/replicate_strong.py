"""The replication report's strong-LM column: a pretrained LM (SmolLM2-135M at full scale) with a
WikiText-2 datastore, for the claims it can test. Perplexities are per token of its tokenizer."""

from __future__ import annotations

import os

import replicate_checks as checks

LABEL = "strong LM"


def experiment(root: str, run: str, model: str, rows_of, load) -> dict:
    from replicate import STRONG_DOMAIN

    tag = f" — {os.path.basename(model)}"
    long_dir, short_dir = (os.path.join(run, "eval", name) for name in ("table1-long", "table1-short"))
    r_long, r_short = load(os.path.join(long_dir, "results.json")), load(os.path.join(short_dir, "results.json"))
    t_long, t_short = rows_of(r_long), rows_of(r_short)
    saved = checks.per_token(r_long)
    t1 = checks.temperatures(long_dir, r_long)["t1"]
    base, knn, cache = t_long["base LM"], t_long["+kNN-LM"], t_long["+cache"]
    approx = rows_of(load(os.path.join(run, "eval", "table1-approx", "results.json")))["+kNN-LM"]
    q = load(os.path.join(root, "exact_vs_approximate_strong.json"))
    g = load(os.path.join(root, "ngram-strong.json"))
    best_ng = min(g["orders"], key=lambda r: r["valid_ppl"])
    knn_valid = r_short["valid"]["knn"]["ppl"]
    d_dir = os.path.join(run, "eval", STRONG_DOMAIN)
    d = load(os.path.join(d_dir, "results.json"))
    t_d = rows_of(d)
    d_saved = checks.per_token(d)
    gain_ng, gain_knn = g["base_valid_ppl"] - best_ng["valid_ppl"], g["base_valid_ppl"] - knn_valid
    claims = [
        dict(claim="the kNN-LM lowers test perplexity without training (Table 1)" + tag,
             paper="18.65 → 16.12 (−13.6%)", ours=f"{base:.2f} → {knn:.2f} per token",
             t1=f"{base:.2f} → {t1['ppl']:.2f} (λ {t1['lmbda']:.2f})", holds=knn < base, holds_t1=t1["ppl"] < base,
             interval=checks.interval(saved["lm"], saved["mixed"])),
        dict(claim=f"the kNN-LM helps more than the continuous cache alone (Table 1; context {r_long['context']}, "
                   f"cache {r_long['cache']['cache']['size']:,})" + tag, paper="16.12 vs 18.27", ours=f"{knn:.2f} vs {cache:.2f}",
             holds=knn < cache, interval=checks.interval(saved["cache"], saved["mixed"])),
        dict(claim="the continuous cache helps on top of the kNN-LM (Table 1)" + tag,
             paper="kNN-LM 16.12 → + cache 15.79", ours=f"{knn:.2f} → {t_long['+kNN-LM+cache']:.2f}",
             holds=t_long["+kNN-LM+cache"] < knn, interval=checks.interval(saved["mixed"], saved["knn_cache"])),
        dict(claim=f"exact L2 beats FAISS's quantised distances at the paper's code precision ({q['factory']}; "
                   "Section 5)" + tag, paper="16.06 vs 16.5 (valid)",
             ours=f"{q['exact']['test_knn_ppl']:.2f} vs {q['approximate']['test_knn_ppl']:.2f} (first "
                  f"{q['tokens']['test']:,} test tokens)",
             holds=q["exact"]["test_knn_ppl"] < q["approximate"]["test_knn_ppl"]),
        dict(claim="interpolating an n-gram LM gives little next to the kNN-LM (Figure 7)" + tag,
             paper="about 0.2 vs 1.9 (dev)", ours=f"{gain_ng:.2f} (n = {best_ng['n']}) vs {gain_knn:.2f} (valid)",
             holds=gain_ng < gain_knn / 4),
        dict(claim=f"a datastore of another domain helps ({STRONG_DOMAIN}; Table 4)" + tag,
             paper="Books: 34.84 → 20.47", ours=f"{t_d['base LM']:.2f} → {t_d['+kNN-LM']:.2f}",
             holds=t_d["+kNN-LM"] < t_d["base LM"], interval=checks.interval(d_saved["lm"], d_saved["mixed"])),
        dict(claim=f"domain adaptation prefers a larger λ than in-domain ({STRONG_DOMAIN} vs WikiText-2; Figure 5)"
                   + tag, paper="0.65 vs 0.25", ours=f"{d['knn']['lmbda']:.2f} vs {r_short['knn']['lmbda']:.2f}",
             holds=d["knn"]["lmbda"] > r_short["knn"]["lmbda"]),
    ]
    md = [f"| test, per token ({r_long['tokens']:,} tokens) | context {r_long['context']} | context "
          f"{r_short['context']} (default) |", "|---|---|---|"]
    md += [f"| {name} | {t_long[name]:.2f} | {t_short[name]:.2f} |"
           for name in ("base LM", "+kNN-LM", "+cache", "+kNN-LM+cache")]
    md += ["", f"With the default context the cache reaches {r_long['cache']['cache']['size']:,} tokens back, beyond "
               f"the LM's {r_short['context']}: the control for the cache's gain. Exact vs FAISS's distances at the "
               f"default index ({r_short['index']}), default context: {t_short['+kNN-LM']:.2f} vs {approx:.2f} (shown, "
               "not counted). "
               f"{STRONG_DOMAIN}: λ {d['knn']['lmbda']:.2f}, T {d['knn']['temperature']:.3g}; WikiText-2 (default "
               f"context): λ {r_short['knn']['lmbda']:.2f}, T {r_short['knn']['temperature']:.3g}."]
    return dict(claims=claims, md=md, table=dict(long=t_long, short=t_short, approximate_default=approx,
                                                 paper_precision=q, ngram=g, domain=dict(rows=t_d, knn=d["knn"]),
                                                 t1=t1))
