"""One self-contained HTML page of an evaluated text: what retrieval did, token by token.

Tokens are coloured by how much the kNN-LM helped (green) or hurt (red) each one, the log
ratio of the mixed to the LM's probability of the target; clicking a token shows p_LM,
p_kNN and the mixture, and its nearest neighbours with their datastore text (the words
before each entry and its value). A filter leaves ``<unk>`` uncoloured; the run's table and
its k and λ sweeps (PNG, inlined) head the page. No external script, style or font: the
data is one JSON block, the script and styles are inline, so the page works offline.
"""

from __future__ import annotations

import base64
import html
import json
import os

import numpy as np

from knnlm_jax.retrieval.knn import neighbour_log_weights

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 15px/1.6 system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }}
#text {{ flex: 3; overflow-y: auto; padding: 1em 2em; }}
#side {{ flex: 2; overflow-y: auto; padding: 1em; background: #f6f6f6; border-left: 1px solid #ccc; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.t {{ cursor: pointer; border-radius: 3px; padding: 0 1px; white-space: pre; }} .t.sel {{ outline: 2px solid #333; }}
.hit {{ font-weight: bold; }} img {{ max-width: 100%; }} .ctx {{ color: #555; }}
</style></head><body>
<div id="text"><h2>{title}</h2>
<label><input type="checkbox" id="skipunk"> leave <code>&lt;unk&gt;</code> uncoloured</label>
<span id="legend"> green: the kNN-LM raised the target's probability; red: lowered it.</span>
<div id="tokens"></div></div>
<div id="side"><div id="detail"><p>Click a token to see its neighbours.</p></div>
<h3>Results</h3>{table}{sweeps}</div>
<script type="application/json" id="data">{data}</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent);
const box = document.getElementById("tokens"), detail = document.getElementById("detail");
function colour(g) {{
  const a = Math.min(1, Math.abs(g) / 2).toFixed(3);
  return g >= 0 ? `rgba(0,160,0,${{a}})` : `rgba(220,0,0,${{a}})`;
}}
function paint() {{
  const skip = document.getElementById("skipunk").checked;
  for (const s of box.children) {{
    if (s.dataset.i === undefined) continue;
    const t = D.tokens[+s.dataset.i];
    s.style.background = (skip && t.w === "<unk>") ? "transparent" : colour(t.g);
  }}
}}
function esc(x) {{ const d = document.createElement("div"); d.textContent = x; return d.innerHTML; }}
function show(i, span) {{
  for (const s of box.querySelectorAll(".sel")) s.classList.remove("sel");
  span.classList.add("sel");
  const t = D.tokens[i];
  let h = `<h3>${{esc(t.s)}}</h3><table><tr><th>p_LM</th><th>p_kNN</th><th>mixed</th><th>log gain</th></tr>` +
    `<tr><td>${{t.lm.toExponential(3)}}</td><td>${{t.knn.toExponential(3)}}</td><td>${{t.mix.toExponential(3)}}</td>` +
    `<td>${{t.g.toFixed(3)}}</td></tr></table>` +
    `<p>context: <span class="ctx">${{esc(t.ctx)}}</span> <b>${{esc(t.s)}}</b></p>`;
  h += `<h4>nearest neighbours (λ ${{D.lmbda}}, T ${{D.temperature.toPrecision(4)}})</h4>` +
    `<table class="nb"><tr><th>#</th><th>distance</th><th>weight</th><th>datastore text → value</th></tr>`;
  t.nb.forEach((n, j) => {{
    h += `<tr class="${{n.v === t.s ? "hit" : ""}}"><td>${{j + 1}}</td><td>${{n.d.toFixed(2)}}</td>` +
      `<td>${{n.p.toFixed(3)}}</td><td><span class="ctx">${{esc(n.c)}}</span> → <b>${{esc(n.v)}}</b></td></tr>`;
  }});
  detail.innerHTML = h + "</table>";
}}
D.tokens.forEach((t, i) => {{
  if (t.w === "</s>") {{ box.appendChild(document.createElement("br")); return; }}
  const s = document.createElement("span");
  s.className = "t"; s.dataset.i = i; s.title = `log gain ${{t.g.toFixed(3)}}`;
  s.textContent = D.subword ? t.w.replace(/\\n/g, "\u21b5") : t.w;  // a newline token stays clickable
  s.addEventListener("click", () => show(i, s));
  box.appendChild(s);
  if (!D.subword) box.appendChild(document.createTextNode(" "));  // subword tokens carry their own spaces
  else for (const _ of t.w.matchAll(/\\n/g)) box.appendChild(document.createElement("br"));
}});
document.getElementById("skipunk").addEventListener("change", paint);
paint();
</script></body></html>
"""


def token_records(files, logp_knn_N, logp_mixed_N, vocab, vals_N, temperature: float, n: int,
                  neighbours: int = 8, before: int = 10) -> list[dict]:
    """The page's data for the first ``n`` tokens: word, probabilities, gain, context and neighbours."""
    n = min(n, files.n)
    tokens = np.asarray(files.targets[:n])
    dists_NxK, ids_NxK = np.asarray(files.dists[:n], np.float32), np.asarray(files.ids[:n])
    weights_NxK = np.exp(np.asarray(neighbour_log_weights(dists_NxK, ids_NxK >= 0, temperature)))  # one call
    records = []
    for p in range(n):
        d, ids, weights = dists_NxK[p], ids_NxK[p], weights_NxK[p]
        found = np.flatnonzero(ids >= 0)[:neighbours]
        nb = [dict(d=float(d[j]), p=float(weights[j]), v=vocab.shown_token(vals_N[ids[j]]),
                   c=vocab.shown(vals_N[max(0, int(ids[j]) - before) : int(ids[j])])) for j in found]
        lm, mixed = float(files.logp_lm[p]), float(logp_mixed_N[p])
        records.append(dict(w=vocab.words[int(tokens[p])], lm=float(np.exp(lm)), knn=float(np.exp(logp_knn_N[p])),
                            mix=float(np.exp(mixed)), g=mixed - lm, s=vocab.shown_token(tokens[p]),
                            ctx=vocab.shown(tokens[max(0, p - before) : p]), nb=nb))
    return records


def results_table(rows: list[dict]) -> str:
    body = "".join(f"<tr><td>{html.escape(r['name'])}</td><td>{r['ppl']:.3f}</td><td>{r['change_pct']:+.1f}%</td>"
                   "</tr>" for r in rows)
    return f"<table><tr><th></th><th>perplexity</th><th>change</th></tr>{body}</table>"


def inline_png(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}">'


def write_html(path: str, *, title: str, records: list[dict], rows: list[dict], lmbda: float, temperature: float,
               sweep_pngs=(), subword: bool = False) -> None:
    """Write the page (to ``path.tmp``, then renamed). ``subword``: tokens are shown as they decode,
    spaces included, and the newline token ends a line (a pretrained LM's tokenizer)."""
    data = json.dumps(dict(tokens=records, lmbda=lmbda, temperature=temperature, subword=subword), allow_nan=False)
    data = data.replace("</", "<\\/")  # no "</script>" inside the JSON block
    sweeps = "".join(inline_png(p) for p in sweep_pngs if os.path.isfile(p))
    page = PAGE.format(title=html.escape(title), table=results_table(rows),
                       sweeps=f"<h3>Sweeps on valid</h3>{sweeps}" if sweeps else "", data=data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(path + ".tmp", path)


def write_from_results(path: str, n: int, results: dict, vocab, vals_N) -> None:
    """The explorer of an evaluation's first ``n`` tokens, from its results and saved files."""
    from knnlm_jax.evaluation.token_files import open_token_files

    split = results["split"]
    files = open_token_files(results["files"]["tokens"][split])
    logprobs = np.load(results["files"]["logprobs"])
    knn = results["knn"]
    records = token_records(files, logprobs["knn"], logprobs["mixed"], vocab, vals_N, knn["temperature"], n)
    write_html(path, title=f"kNN-LM on {split} ({len(records)} tokens), datastore {results['datastore']}",
               records=records, rows=results["rows"], lmbda=knn["lmbda"], temperature=knn["temperature"],
               sweep_pngs=[p for p in results["files"]["sweeps"] if p.endswith(".png")],
               subword=hasattr(vocab, "count_words"))
