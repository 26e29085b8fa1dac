"""Streaming kNN-LM evaluation (Khandelwal et al. 2020) end to end: one split, tuned on valid.

Stage 1, :mod:`~knnlm_jax.evaluation.streaming`: the streaming pass writes each split's per-token
files (:mod:`~knnlm_jax.evaluation.token_files`; reused when they answer the same question). Stage 2,
:mod:`~knnlm_jax.evaluation.mixing`: pure-JAX mixing over those files; ``auto`` parameters are tuned
on valid, then applied to the requested split. Perplexity is ``exp`` of the token-weighted
mean NLL over exactly the scored tokens. Then the sweeps on valid
(:mod:`~knnlm_jax.evaluation.sweeps`) and the examples (:mod:`~knnlm_jax.evaluation.report`).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from knnlm_jax.core.report import write_json
from knnlm_jax.data.windows import WindowSpec
from knnlm_jax.datastore.format import Datastore
from knnlm_jax.datastore.retriever import Retriever
from knnlm_jax.evaluation import outputs as eval_outputs
from knnlm_jax.evaluation.mixing import knn_log_probs, mix, tune_cache, tune_knn
from knnlm_jax.evaluation.outputs import Staging
from knnlm_jax.evaluation.report import helped_most, json_safe
from knnlm_jax.evaluation.settings import LAMBDAS, TEMPERATURES, EvaluationError, Settings, drop_self_for, perplexity
from knnlm_jax.evaluation.streaming import CacheSpec, Scorer, StreamSpec, evaluate_tokens
from knnlm_jax.evaluation.sweeps import plot_sweep, sweep_k, sweep_lambda
from knnlm_jax.evaluation.token_files import TokenFiles, files_match, open_token_files
from knnlm_jax.models.adaptive import band_edges, build_capacities
from knnlm_jax.retrieval.policies import Gate, Policy, fit_gate


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """What an evaluation works with: the LM side, the datastore and its searcher, the vocabulary, the settings."""

    scorer: Scorer
    store: Datastore
    searcher: object  # a :class:`~knnlm_jax.retrieval.searcher.Searcher` or a FAISS index
    vocab: object
    settings: Settings

    def retriever(self) -> Retriever:
        """The datastore's retriever at the settings' ``k`` and mode; ``nprobe`` the settings', else the index's."""
        settings = self.settings
        return Retriever.for_store(self.store, self.searcher, settings.k, settings.exact, settings.nprobe)


@dataclasses.dataclass(frozen=True)
class SplitRun:
    """One evaluation's splits and where it writes: ``splits`` maps names to ``(Split, tokens)``."""

    stage: Staging
    split: str
    splits: dict
    capacities: tuple
    progress: bool = True
    log: object = print


def split_files(job: EvalJob, retriever: Retriever, where: SplitRun, split: str,
                policy: Policy = Policy()) -> TokenFiles:
    """The per-token files of one split under ``policy``: reused when saved ones match, else computed.

    The full kNN-LM's files are ``tokens-SPLIT``, another policy's ``tokens-SPLIT-POLICY``.
    """
    settings, store, m = job.settings, job.store, job.store.manifest
    data, tokens_N = where.splits[split]
    requested = split == where.split
    tokens = settings.head(tokens_N, tuning_only=not requested)
    drop = drop_self_for(settings, m, data, len(tokens_N), requested)
    identity = dict(model_fingerprint=job.scorer.trained.fingerprint, key_type=job.scorer.key_type,
                    datastore=store.name, datastore_created=m.get("created"), datastore_entries=store.size,
                    index=m.get("index"), corpus=data.corpus, split=data.split, corpus_sha256=data.sha256,
                    targets=len(tokens), window=settings.window, context=settings.context, k=settings.k,
                    exact=settings.exact, nprobe=retriever.nprobe, drop_self=drop,
                    searcher=retriever.searcher.kind,
                    cache_thetas=list(settings.cache_thetas) if settings.cache else None,
                    cache_size=settings.cache_size if settings.cache else None, **policy.identity())
    name = f"tokens-{split}" + ("" if policy.full else f"-{policy.name}")
    for directory in () if settings.recompute else where.stage.saved(name):
        saved = open_token_files(directory)
        if files_match(saved, identity):
            where.log(f"{split}: reusing the per-token files in {where.stage.final(directory)}")
            return saved
    spec = StreamSpec(WindowSpec(settings.window, settings.context), settings.batch_size,
                      cache=CacheSpec(tuple(settings.cache_thetas), settings.cache_size) if settings.cache else None,
                      drop_self=drop, policy=policy, identity=identity, progress=where.progress,
                      desc=f"{split} {store.name}")
    return evaluate_tokens(where.stage.path(name), job.scorer, tokens, spec, retriever, capacities=where.capacities)


def saved_fraction(files: TokenFiles) -> float:
    """FoSS: the fraction of the split's tokens that did not search (gated off or served by pointers)."""
    if files.retrieved is not None and (files.meta.get("policy") or {}).get("policy") == "full":
        return float(1.0 - np.mean(files.retrieved))  # the full files seen through the gate
    return float(files.meta.get("foss") or 0.0)


def union_capacities(trained, settings: Settings, token_arrays) -> tuple:
    """Adaptive-softmax capacities that fit every split evaluated in one run (the tokens each
    evaluates, :meth:`Settings.head`): one compiled shape."""
    edges = band_edges(trained.cfg.vocab_size, trained.cfg.cutoffs)
    spec = WindowSpec(settings.window, settings.context)
    caps = [build_capacities(tokens, spec.windows(len(tokens)), settings.batch_size, edges, settings.window)
            for tokens in token_arrays]
    return tuple(int(c) for c in np.max(caps, axis=0)) if caps and caps[0] else ()


def fit_adaptive_gate(valid: TokenFiles, settings: Settings) -> tuple[Gate, dict]:
    """The adaptive-retrieval gate, fitted on the first half of valid (the full kNN-LM's files).

    The gain at a token is ``log p_mixed - log p_LM`` of its target with the full kNN-LM's λ and
    T (given, or tuned on valid); the threshold lets ``settings.retrieve_fraction`` of the
    fitting tokens retrieve.
    """
    if valid.features is None:
        raise EvaluationError(f"{valid.directory} has no LM features (older files): rerun with --recompute")
    lmbda, temperature = settings.lmbda, settings.temperature
    if lmbda is None or temperature is None:
        best = tune_knn(valid, LAMBDAS if lmbda is None else (lmbda,),
                        TEMPERATURES if temperature is None else (temperature,))
        lmbda, temperature = best["lmbda"], best["temperature"]
    half = valid.head(valid.n // 2)
    lm = np.asarray(half.logp_lm)
    gain = mix(lm, knn_log_probs(half, [temperature])[0], lmbda) - lm
    gate = fit_gate(np.asarray(half.features), gain, settings.retrieve_fraction)
    return gate, dict(dataclasses.asdict(gate), fitted_on=f"valid tokens 0..{half.n - 1}", temperature=temperature,
                      lmbda=lmbda, helped_fraction=float((gain > 0).mean()))


def count_words(vocab, files: TokenFiles) -> int:
    """The word count of a subword-tokenised split's scored text (0 for a word-level vocabulary)."""
    return int(vocab.count_words(np.asarray(files.targets))) if hasattr(vocab, "count_words") else 0


def per_word(ppl: float, tokens: int, words: int) -> float:
    """Per-word perplexity from per-token: the same summed NLL over ``words`` instead of ``tokens``."""
    return float(np.exp(np.log(ppl) * tokens / words))


def _rows(base: float, named: list[tuple[str, float]]) -> list[dict]:
    rows = [dict(name="base LM", ppl=base, change_pct=0.0)]
    for name, ppl in named:
        rows.append(dict(name=name, ppl=ppl, change_pct=100.0 * (ppl - base) / base))
    return rows


def run(out_dir: str, job: EvalJob, split: str, splits: dict, *, progress: bool = True, log=print,
        record: dict | None = None) -> dict:
    """Evaluate ``split`` with the datastore; tune ``auto`` parameters on ``splits['valid']``.

    ``splits`` maps split names to ``(Split, tokens)``. Writes the per-token files, the
    per-token log-probs (``.npz``), the sweeps (JSON and PNG) and ``results.json`` (the
    results with ``record``'s fields, e.g. the command's config) into ``out_dir``, replacing
    the last complete evaluation there only once this one is complete
    (:mod:`~knnlm_jax.evaluation.outputs`); returns the results.
    """
    job.settings.check()
    with eval_outputs.staging(out_dir) as stage:
        results = _run(job, stage, split, splits, progress, log)
        results.update(record or {})
        write_json(stage.path(eval_outputs.RESULTS), json_safe(results))
        stage.commit()
    return results


def evaluated_splits(settings: Settings, split: str, splits: dict) -> list[str]:
    """The splits one evaluation scores: ``split``, after valid when anything is tuned or gated there."""
    adaptive = settings.retrieve_fraction < 1
    if adaptive and split == "valid":
        raise EvaluationError("adaptive retrieval's gate is fitted on valid: report it on another split "
                              "(--split test)")
    if not (settings.tunes or adaptive) or split == "valid":
        return [split]
    if "valid" not in splits:
        raise EvaluationError("auto parameters are tuned on valid, but there is no valid split")
    if splits["valid"][0].sha256 == splits[split][0].sha256:
        raise EvaluationError(f"the valid split is the same text as {split} (a single-file corpus?): "
                              + ("adaptive retrieval's gate needs held-out valid text" if adaptive else
                                 "give --lmbda, --temperature (and the cache's) as numbers instead of auto"))
    return ["valid", split]


def all_files(job: EvalJob, retriever: Retriever, where: SplitRun, evaluated: list[str]):
    """``(files per split, policy, gate report)``: the adaptive gate is fitted on valid's first half
    from the full kNN-LM's files; then every split's files under the run's policy."""
    settings = job.settings
    policy, gate_report, files = Policy(settings.min_pointers, max_pointers=settings.max_pointers), None, {}
    if settings.retrieve_fraction < 1:
        valid_full = split_files(job, retriever, where, "valid", Policy())
        gate, gate_report = fit_adaptive_gate(valid_full, settings)
        policy = Policy(settings.min_pointers, gate, settings.max_pointers)
        if not settings.min_pointers:  # the same neighbours where the gate retrieves: no second pass
            files["valid"] = dataclasses.replace(valid_full, retrieved=gate.retrieve(valid_full.features))
    for s in evaluated:
        if s not in files:
            files[s] = split_files(job, retriever, where, s, policy)
    return files, policy, gate_report


def _run(job: EvalJob, stage: Staging, split: str, splits: dict, progress: bool, log) -> dict:
    settings = job.settings
    retriever = job.retriever()
    evaluated = evaluated_splits(settings, split, splits)
    caps = union_capacities(job.scorer.trained, settings,
                            [settings.head(splits[s][1], tuning_only=s != split) for s in evaluated])
    where = SplitRun(stage, split, splits, caps, progress, log)
    files, policy, gate_report = all_files(job, retriever, where, evaluated)
    target, tuning = files[split], files["valid"] if settings.tunes else None
    mixed = mix_knn(settings, target, tuning, retriever.nprobe)
    named = [("+kNN-LM", perplexity(mixed.logp_mixed))]
    cache = mix_caches(settings, target, tuning, mixed, named) if settings.cache else None
    rows, words = word_rows(job.vocab, target, _rows(perplexity(target.logp_lm), named))
    if tuning is not None:
        mixed.valid_report.update(valid_summary(job.vocab, tuning, mixed.valid_report))
    sweeps = write_sweeps(stage, job.store.name, split, target, tuning, mixed, log)
    npz = f"logprobs-{split}.npz"
    np.savez(stage.path(npz), **mixed.per_token)
    examples = []
    if settings.show:
        examples = helped_most(target, mixed.logp_knn, mixed.logp_mixed, np.asarray(target.targets), job.vocab,
                               job.store.vals, settings.show, mixed.knn["temperature"], skip=settings.show_skip)
    return dict(
        split=split, corpus_name=splits[split][0].corpus, datastore=job.store.name, datastore_entries=job.store.size,
        index="exact on device (JAX)" if retriever.searcher.kind == "device"
        else (job.store.manifest.get("index") or {}).get("factory"),
        tokens=target.n, unit="word" if not words else "token", words=words or None, window=settings.window,
        context=settings.context, rows=rows, knn=mixed.knn, cache=cache, tuned_on_valid=bool(settings.tunes),
        valid=mixed.valid_report or None, drop_self=target.meta.get("drop_self"),
        self_dropped=target.meta.get("self_dropped", 0), not_found=target.meta.get("not_found", 0),
        sweeps=sweeps, examples=examples,
        speed={s: dict(seconds=f.meta.get("seconds"), tokens_per_s=f.meta.get("tokens_per_s"),
                       timings=f.meta.get("timings")) for s, f in files.items()},
        retrieval=dict(policy=policy.name, min_pointers=settings.min_pointers,
                       retrieve_fraction=settings.retrieve_fraction, gate=gate_report,
                       foss={s: saved_fraction(f) for s, f in files.items()}),
        files=dict(tokens={s: stage.final(f.directory) for s, f in files.items()}, logprobs=stage.final(npz),
                   sweeps=[stage.final(f"sweep_{x}.{e}") for x in ("k", "lambda") for e in ("json", "png")]
                   if sweeps else []),
    )


@dataclasses.dataclass
class KnnMixture:
    """The kNN-LM on the reported split: λ and T (given or tuned), the per-token log-probs, valid's grids."""

    knn: dict
    logp_knn: np.ndarray
    logp_mixed: np.ndarray
    tuning: TokenFiles | None
    valid_report: dict
    per_token: dict


def tuned_label(settings: Settings, tuning: TokenFiles | None) -> str:
    return "tuned on valid" + (f" (its first {tuning.n} tokens)"
                               if tuning is not None and settings.tune_tokens == tuning.n else "")


def mix_knn(settings: Settings, target: TokenFiles, tuning: TokenFiles | None, nprobe: int | None) -> KnnMixture:
    """λ and T (tuned on ``tuning`` where ``auto``) and the kNN-LM's log-probs on ``target``."""
    knn = dict(k=settings.k, exact=settings.exact, nprobe=nprobe)
    valid_report, tuned = {}, tuned_label(settings, tuning)
    if tuning is not None and (settings.lmbda is None or settings.temperature is None):
        best = tune_knn(tuning, LAMBDAS if settings.lmbda is None else (settings.lmbda,),
                        TEMPERATURES if settings.temperature is None else (settings.temperature,))
        knn.update(lmbda=best["lmbda"], temperature=best["temperature"],
                   lmbda_source=tuned if settings.lmbda is None else "given",
                   temperature_source=tuned if settings.temperature is None else "given")
        valid_report["knn"] = dict(ppl=best["ppl"], grid=best["grid"], fine_grid=best.get("fine_grid"))
    else:
        knn.update(lmbda=settings.lmbda, temperature=settings.temperature, lmbda_source="given",
                   temperature_source="given")
    logp_knn = knn_log_probs(target, [knn["temperature"]])[0]
    logp_mixed = mix(target.logp_lm, logp_knn, knn["lmbda"])
    per_token = dict(targets=np.asarray(target.targets), lm=np.asarray(target.logp_lm), knn=logp_knn,
                     mixed=logp_mixed)
    return KnnMixture(knn, logp_knn, logp_mixed, tuning, valid_report, per_token)


def mix_caches(settings: Settings, target: TokenFiles, tuning: TokenFiles | None, mixed: KnnMixture,
               named: list) -> dict:
    """The continuous cache alone and on top of the kNN-LM: its λc and θ per row (tuned where
    ``auto``); adds their rows to ``named`` and their log-probs to ``mixed.per_token``."""
    thetas = tuple(settings.cache_thetas)
    lambdas = LAMBDAS if settings.cache_lambda is None else (settings.cache_lambda,)
    tune_here = tuning is not None and (settings.cache_lambda is None or len(thetas) > 1)
    valid_mixed = None
    if tune_here:
        valid_mixed = mixed.logp_mixed if tuning is target else mix(
            tuning.logp_lm, knn_log_probs(tuning, [mixed.knn["temperature"]])[0], mixed.knn["lmbda"])
    cache, tuned = {}, tuned_label(settings, tuning)
    for name, label, on_target, on_valid in (
            ("cache", "+cache", target.logp_lm, tuning.logp_lm if tune_here else None),
            ("knn_cache", "+kNN-LM+cache", mixed.logp_mixed, valid_mixed)):
        if tune_here:
            best = tune_cache(on_valid, tuning.cache, thetas, lambdas)
            chosen = dict(lmbda=best["lmbda"], theta=best["theta"],
                          lmbda_source=tuned if settings.cache_lambda is None else "given",
                          theta_source=tuned if len(thetas) > 1 else "given")
            mixed.valid_report[name] = dict(ppl=best["ppl"], grid=best["grid"])
        else:
            chosen = dict(lmbda=settings.cache_lambda, theta=thetas[0], lmbda_source="given", theta_source="given")
        chosen["size"] = settings.cache_size
        cache[name] = chosen
        logp_cache = np.asarray(target.cache[:, thetas.index(chosen["theta"])])
        logp = mix(on_target, logp_cache, chosen["lmbda"])
        mixed.per_token[name] = logp
        mixed.per_token[f"{name}_p_cache"] = logp_cache
        named.append((label, perplexity(logp)))
    return cache


def word_rows(vocab, target: TokenFiles, rows: list[dict]) -> tuple[list[dict], int]:
    """The rows with their per-word perplexity where the vocabulary is subword; ``(rows, words)``."""
    words = count_words(vocab, target)
    if words:
        for row in rows:
            row["word_ppl"] = per_word(row["ppl"], target.n, words)
    return rows, words


def valid_summary(vocab, tuning: TokenFiles, report: dict) -> dict:
    """Valid's base perplexity and token count, and per word where the vocabulary is subword."""
    out = dict(base_ppl=perplexity(tuning.logp_lm), tokens=tuning.n)
    words = count_words(vocab, tuning)
    if words:
        out["words"] = words
        out["word_ppl"] = {k: per_word(v["ppl"], tuning.n, words) for k, v in report.items()
                           if isinstance(v, dict) and "ppl" in v}
        out["word_ppl"]["base"] = per_word(out["base_ppl"], tuning.n, words)
    return out


def write_sweeps(stage: Staging, store_name: str, split: str, target: TokenFiles, tuning: TokenFiles | None,
                 mixed: KnnMixture, log) -> dict | None:
    """The k and λ sweeps on valid, as the paper's Figures 4 and 5 (never on test): JSON and PNG."""
    on_valid = tuning if tuning is not None else (target if split == "valid" else None)
    if on_valid is None:
        log("sweeps are drawn on valid: none this time (evaluate --split valid, or leave a parameter auto)")
        return None
    temperature, lmbda = mixed.knn["temperature"], mixed.knn["lmbda"]
    valid_knn = mixed.logp_knn if on_valid is target else knn_log_probs(on_valid, [temperature])[0]
    sweeps = dict(k=sweep_k(on_valid, temperature, lmbda), lmbda=sweep_lambda(on_valid, valid_knn, temperature))
    for name, sweep, x, xlabel, log2x in (("k", sweeps["k"], "k", "k (number of neighbours)", True),
                                          ("lambda", sweeps["lmbda"], "lmbda", "interpolation parameter λ", False)):
        with open(stage.path(f"sweep_{name}.json"), "w") as f:
            json.dump(json_safe(dict(sweep, split="valid", datastore=store_name)), f, indent=2)
        plot_sweep(stage.path(f"sweep_{name}.png"), sweep[x], sweep["ppl"], sweep["base_ppl"],
                   xlabel=xlabel, title=f"valid, datastore {store_name}", log2x=log2x)
    return sweeps
