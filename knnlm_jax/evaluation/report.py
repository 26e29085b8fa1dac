"""What an evaluation prints: the results table, the targets kNN helped most (the paper's Figure 6), strict JSON."""

from __future__ import annotations

import math

import numpy as np

from knnlm_jax.retrieval.knn import neighbour_log_weights
from knnlm_jax.evaluation.token_files import TokenFiles


def helped_most(files: TokenFiles, logp_knn_N, logp_mixed_N, tokens_N, vocab, vals_N, n: int, temperature: float,
                neighbours: int = 3, before: int = 12, after: int = 3, skip=()) -> list[dict]:
    """The ``n`` targets where kNN helped most (largest ``log p_mixed - log p_LM``), with their
    context and, for the top neighbours, the datastore text around each retrieved entry.
    Targets whose word is in ``skip`` (e.g. ``<unk>``) are not listed."""
    gain = np.asarray(logp_mixed_N, np.float64) - np.asarray(files.logp_lm, np.float64)
    skipped = [vocab.index[w] for w in skip if w in vocab.index]
    if skipped:
        gain = np.where(np.isin(np.asarray(tokens_N), skipped), -np.inf, gain)
    examples = []
    for p in np.argsort(-gain, kind="stable")[:n]:
        if not np.isfinite(gain[p]):
            break
        p = int(p)
        d, ids = np.asarray(files.dists[p], np.float32), np.asarray(files.ids[p])
        weights = np.exp(np.asarray(neighbour_log_weights(d[None], ids[None] >= 0, temperature))[0])
        found = []
        for j in np.flatnonzero(ids >= 0)[:neighbours]:
            i = int(ids[j])
            found.append(dict(id=i, distance=float(d[j]), weight=float(weights[j]), value=vocab.shown_token(vals_N[i]),
                              hit=bool(files.hit[p, j]), before=vocab.shown(vals_N[max(0, i - before) : i]),
                              after=vocab.shown(vals_N[i + 1 : i + 1 + after])))
        examples.append(dict(position=p, context=vocab.shown(tokens_N[max(0, p - before) : p]),
                             target=vocab.shown_token(tokens_N[p]), after=vocab.shown(tokens_N[p + 1 : p + 1 + after]),
                             gain=float(gain[p]),
                             p_lm=float(np.exp(files.logp_lm[p])), p_knn=float(np.exp(logp_knn_N[p])),
                             p_mixed=float(np.exp(logp_mixed_N[p])), neighbours=found))
    return examples


def format_examples(examples: list[dict]) -> str:
    """The paper's Figure 6 as text: each target in [brackets] with its context, then the datastore
    text around its nearest neighbours (their value in [brackets]; "hit" when it is the target)."""
    lines = []
    for e, ex in enumerate(examples, 1):
        lines.append(f"[{e}] position {ex['position']}: p_LM {ex['p_lm']:.3g}  p_kNN {ex['p_knn']:.3g}  "
                     f"mixed {ex['p_mixed']:.3g}  (+{ex['gain']:.2f} nats)")
        lines.append(f"    context: ... {ex['context']} [{ex['target']}] {ex['after']} ...")
        for j, nb in enumerate(ex["neighbours"], 1):
            lines.append(f"    neighbour {j} (entry {nb['id']}, d {nb['distance']:.3g}, weight {nb['weight']:.3f}, "
                         f"{'hit' if nb['hit'] else 'miss'}): ... {nb['before']} [{nb['value']}] {nb['after']} ...")
    return "\n".join(lines)


def json_safe(obj):
    """``obj`` with infinite or NaN floats as ``None`` (strict JSON has no Infinity)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def format_table(results: dict) -> str:
    r = results
    head = (f"{r['split']} split of {r['corpus_name']}: {r['tokens']} tokens scored ({r['unit']}-level perplexity), "
            f"window {r['window']}, context >= {r['context']}")
    lines = [head]
    if r.get("knn"):
        s = r["knn"]
        lines.append(f"datastore {r['datastore']} ({r['datastore_entries']} entries, {r['index']}, "
                     f"{'exact' if s['exact'] else 'approximate'} L2), k={s['k']}, T={s['temperature']:.3g}, "
                     f"lambda={s['lmbda']:.2f} ({s['lmbda_source']})")
    width = max(len(row["name"]) for row in r["rows"]) + 2
    words = bool(r.get("words"))  # a subword LM on a word-level corpus: per-word perplexity beside per-token
    if words:
        lines.append(f"per word: the same summed NLL over the text's {r['words']} words (whitespace words and line "
                     "ends, as a word-level vocabulary counts them)")
    lines.append(f"{'':{width}}{'perplexity':>12}{'change':>10}" + (f"{'per word':>12}" if words else ""))
    for row in r["rows"]:
        change = "" if row["name"] == "base LM" else f"{row['change_pct']:+.1f}%"
        lines.append(f"{row['name']:{width}}{row['ppl']:12.3f}{change:>10}"
                     + (f"{row['word_ppl']:12.3f}" if words else ""))
    return "\n".join(lines)


def describe_tuning(r) -> str:
    """How λ, T and the cache were chosen, valid's numbers, the speed and retrieval savings: lines of text."""
    knn = r["knn"]
    parts = [f"kNN-LM: lambda {knn['lmbda']:.2f} ({knn['lmbda_source']}), T {knn['temperature']:.3g} "
             f"({knn['temperature_source']}), k {knn['k']}"]
    for name, c in (r.get("cache") or {}).items():
        parts.append(f"{'cache' if name == 'cache' else 'kNN-LM+cache'}: lambda_c {c['lmbda']:.2f} "
                     f"({c['lmbda_source']}), theta {c['theta']:.3g} ({c['theta_source']}), size {c['size']}")
    if r.get("valid"):
        v = r["valid"]
        parts.append(f"valid ({v['tokens']} tokens): base {v['base_ppl']:.3f}"
                     + "".join(f", {k} {v[k]['ppl']:.3f}" for k in ("knn", "cache", "knn_cache") if k in v))
        if v.get("words"):
            w = v["word_ppl"]
            parts.append(f"valid per word ({v['words']} words): base {w['base']:.3f}"
                         + "".join(f", {k} {w[k]:.3f}" for k in ("knn", "cache", "knn_cache") if k in w))
    for split, speed in r["speed"].items():
        parts.append(f"{split}: {speed['seconds']:.1f}s, {speed['tokens_per_s']:,.0f} tokens/s "
                     "(forward, search, re-ranking and per-token files, compilation included)")
    ret = r.get("retrieval") or {}
    if ret.get("policy", "full") != "full":
        parts.append(f"retrieval: {ret['policy']} (--retomaton {ret['min_pointers']}, --retrieve-fraction "
                     f"{ret['retrieve_fraction']:g}); saved searches (FoSS) "
                     + ", ".join(f"{s} {f:.1%}" for s, f in ret["foss"].items()))
    if r.get("self_dropped"):
        parts.append(f"dropped {r['self_dropped']} self-retrievals (the split is the datastore's own text)")
    return "\n".join(parts)
