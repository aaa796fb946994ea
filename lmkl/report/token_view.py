"""The report's token view: recorded documents as text, each token shaded by a per-token metric.

Reads a run's ``view.parquet`` (recorded by ``lmkl compare --view-tokens N``: both models'
top-5 next tokens on the worst documents) and joins it with ``tokens.parquet`` (the metrics), so
``lmkl report`` needs no model. What it makes for the page:

* the documents as HTML, every token a ``<span>`` whose class is its shade (KL(P‖Q) of the
  first candidate on a log scale), so the text and its shading read without JavaScript;
* the numbers behind the tooltips (token, p and q of the next token, KL both ways, JSD, each
  model's top-5) as one JSON block, and a small script (``templates/token_view.js``) that shows
  them on hover, focus or tap, switches metric and candidate and sorts the document list.

Every string from the models or the data is HTML-escaped here (documents) or written as JSON
with ``<``, ``>`` and ``&`` escaped (so no data can close the data block), and the script only
ever sets ``textContent``. The page's Content-Security-Policy allows exactly this script, by
its SHA-256 hash.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmkl.engine.rundir import load_tokens
from lmkl.errors import OutputError, UsageError
from lmkl.formatting import number
from lmkl.report.runs import RunInfo

#: Tokens the page embeds at most (per candidate): a browser opens 50,000 in well under 2 s.
DEFAULT_MAX_TOKENS = 50_000
#: Shades on the log scale (plus shade 0 below the scale).
SHADES = 8
#: Metrics the view can shade by: name, label in the page.
METRICS: tuple[tuple[str, str], ...] = (
    ("kl", "KL(P‖Q)"),
    ("reverse_kl", "KL(Q‖P)"),
    ("jsd", "JSD"),
    ("delta_p", "|Δp| = |q(x) − p(x)|"),
    ("nll_reference", "NLL of P, −log p(x)"),
    ("nll_candidate", "NLL of Q, −log q(x)"),
)
_READ = ("kl", "reverse_kl", "jsd", "nll_reference", "nll_candidate")
#: Worst tokens per document linked from the document list.
WORST_LINKS = 3


@dataclass
class TokenView:
    """The token view of one run, ready for the template."""

    run_name: str
    candidates: list[str]
    #: Per shown document: unit id, label, scored/total tokens, per-candidate means, links.
    documents: list[dict[str, Any]]
    #: Pre-rendered, escaped HTML of the documents' text.
    text_html: str
    #: The data block (JSON, safe to put inside <script type="application/json">).
    data_json: str
    #: Legend of the initial shading: (css class, label).
    legend: list[tuple[str, str]]
    #: Sentences stating what is shown and the caps.
    cap_note: str
    metrics: tuple[tuple[str, str], ...] = METRICS
    script: str = field(default="")

    @property
    def script_hash(self) -> str:
        """The CSP source allowing exactly :attr:`script`."""
        digest = hashlib.sha256(self.script.encode("utf-8")).digest()
        return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def view_script() -> str:
    """The token view's script, as shipped (its hash goes into the page's CSP)."""
    return resources.files("lmkl.report").joinpath("templates/token_view.js").read_text("utf-8")


def log_edges(values: np.ndarray) -> list[float]:
    """``SHADES + 1`` log-spaced edges from the 5th percentile of the positive values to the
    largest finite one (a flat 1e-4..1 scale when there are none)."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size == 0:
        lo, hi = 1e-4, 1.0
    else:
        lo, hi = float(np.quantile(v, 0.05)), float(v.max())
        lo = max(lo, 1e-8)
        if hi <= lo * 1.0001:
            hi = lo * 10
    return np.geomspace(lo, hi, SHADES + 1).tolist()


def shade(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Shade per value: 0 below the scale, 1..SHADES on it (+inf: the darkest); -1: no value."""
    out = np.searchsorted(np.asarray(edges[:-1]), values, side="right").astype(np.int64)
    out = np.minimum(out, SHADES)
    out[np.isposinf(values)] = SHADES
    out[np.isnan(values)] = -1
    return out


def _rounded(values: np.ndarray, digits: int) -> str:
    """A JSON array of ``values`` to ``digits`` significant digits (NaN: null, +inf: 1e999,
    which JSON.parse reads as Infinity)."""
    if values.size == 0:
        return "[]"
    text = np.char.mod(f"%.{digits}g", values.astype(np.float64))
    text = np.where(np.isnan(values), "null", text)
    text = np.where(np.isposinf(values), "1e999", text)
    text = np.where(np.isneginf(values), "-1e999", text)
    return "[" + ",".join(text.tolist()) + "]"


def _ints(values: np.ndarray) -> str:
    return "[" + ",".join(map(str, values.astype(np.int64).tolist())) + "]"


def _safe_json(value: Any) -> str:
    """JSON that cannot end a <script> element or start markup (``<``, ``>``, ``&`` escaped)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _read_view(path: Path) -> pa.Table:
    try:
        return pq.read_table(path / "view.parquet")
    except (OSError, pa.ArrowException) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise OutputError(
            f"cannot read '{path / 'view.parquet'}': the file is damaged ({reason})",
            "rerun the comparison with --view-tokens N",
        ) from exc


def has_view(run: RunInfo) -> bool:
    return (run.path / "view.parquet").is_file()


def _choose_units(
    view: pa.Table,
    first: str,
    kl: dict[tuple[int, int], float],
    docs: list[int] | None,
    max_tokens: int,
    run: RunInfo,
) -> tuple[list[int], int]:
    """The units to show (worst mean KL first, or ``docs`` in the given order) within the cap."""
    rows = view.filter(pc.equal(view["candidate"], first))
    units = rows["unit"].to_numpy()
    recorded, sizes = np.unique(units, return_counts=True)
    size = dict(zip(recorded.tolist(), sizes.tolist(), strict=True))
    if docs:
        missing = [d for d in docs if d not in size]
        if missing:
            shown = ", ".join(map(str, recorded.tolist()[:20]))
            raise UsageError(
                f"document {missing[0]} is not in the token view of run '{run.path}' "
                f"(recorded: {shown})",
                "pass --doc with a recorded document, or rerun compare with a larger --view-tokens",
            )
        order = list(dict.fromkeys(docs))
    else:
        means: dict[int, list[float]] = {}
        for (u, _), value in kl.items():
            if math.isfinite(value) or value == math.inf:
                means.setdefault(u, []).append(min(value, 1e30))
        order = sorted(
            size, key=lambda u: (-float(np.mean(means[u])) if u in means else math.inf, u)
        )
    chosen, total = [], 0
    for u in order:
        if chosen and total + size[u] > max_tokens:
            continue
        chosen.append(u)
        total += size[u]
    return chosen, len(recorded)


def build_token_view(
    run: RunInfo, docs: list[int] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS
) -> TokenView:
    """The token view of ``run`` (which must have a view.parquet)."""
    view = _read_view(run.path)
    labels = list(dict.fromkeys(view["candidate"].to_pylist()))
    if not labels:
        raise OutputError(f"'{run.path / 'view.parquet'}' is empty", "rerun the comparison")
    doc_ids = pc.unique(view["doc_id"])
    metric_cols = ["candidate", "doc_id", "position", *_READ]
    tokens = load_tokens(run.path, columns=metric_cols, filters=[("doc_id", "in", doc_ids)])
    first = labels[0]
    # Per candidate: (doc_id, position) -> row of tokens.parquet.
    columns: dict[str, dict[str, np.ndarray]] = {}
    lookup: dict[str, dict[tuple[int, int], int]] = {}
    for label in labels:
        t = tokens.filter(pc.equal(tokens["candidate"], label))
        columns[label] = {
            name: pc.fill_null(t[name], math.nan).to_numpy().astype(np.float64) for name in _READ
        }
        keys = zip(t["doc_id"].to_pylist(), t["position"].to_pylist(), strict=True)
        lookup[label] = {k: i for i, k in enumerate(keys)}
    first_rows = view.filter(pc.equal(view["candidate"], first))
    unit_of = dict(
        zip(
            zip(first_rows["doc_id"].to_pylist(), first_rows["position"].to_pylist(), strict=True),
            first_rows["unit"].to_pylist(),
            strict=True,
        )
    )
    kl_first = {
        (unit_of[k], k[1]): float(columns[first]["kl"][i])
        for k, i in lookup[first].items()
        if k in unit_of
    }
    chosen, recorded = _choose_units(view, first, kl_first, docs, max_tokens, run)
    cut = _cut_to_cap(view, first, chosen[0], kl_first, max_tokens)
    tv = _assemble(run, cut, labels, columns, lookup, chosen, recorded, max_tokens)
    if cut.num_rows < view.num_rows:
        tv.cap_note += (
            f" {tv.documents[0]['label'].capitalize()} is longer than that: the "
            f"{max_tokens:,} tokens around its worst one are shown."
        )
    return tv


def _cut_to_cap(
    view: pa.Table, first: str, unit: int, kl: dict[tuple[int, int], float], max_tokens: int
) -> pa.Table:
    """``view`` with a lone unit longer than the cap cut to ``max_tokens`` positions around
    its highest-KL token (every other unit fits by construction)."""
    rows = view.filter(pc.and_(pc.equal(view["candidate"], first), pc.equal(view["unit"], unit)))
    positions = np.sort(rows["position"].to_numpy())
    if positions.size <= max_tokens:
        return view
    values = np.array([kl.get((unit, int(p)), -1.0) for p in positions])
    centre = int(np.argmax(np.nan_to_num(values, nan=-1.0, posinf=1e300)))
    start = int(np.clip(centre - max_tokens // 2, 0, positions.size - max_tokens))
    lo, hi = int(positions[start]), int(positions[start + max_tokens - 1])
    other = pc.not_equal(view["unit"], unit)
    inside = pc.and_(pc.greater_equal(view["position"], lo), pc.less_equal(view["position"], hi))
    return view.filter(pc.or_(other, inside))


def _assemble(
    run: RunInfo,
    view: pa.Table,
    labels: list[str],
    columns: dict[str, dict[str, np.ndarray]],
    lookup: dict[str, dict[tuple[int, int], int]],
    chosen: list[int],
    recorded: int,
    max_tokens: int,
) -> TokenView:
    by_chunk = str(run.results.get("windowing", {}).get("mode")) == "llama-cpp"
    noun = "chunk" if by_chunk else "document"
    per_label = {
        label: view.filter(
            pc.and_(pc.equal(view["candidate"], label), pc.is_in(view["unit"], pa.array(chosen)))
        )
        for label in labels
    }
    base = per_label[labels[0]]
    # Reading order: chosen units in order, positions ascending within each.
    rank = {u: i for i, u in enumerate(chosen)}
    units = base["unit"].to_pylist()
    positions = base["position"].to_pylist()
    order = sorted(range(len(units)), key=lambda i: (rank[units[i]], positions[i]))
    col = {name: base[name].to_pylist() for name in ("doc_id", "token", "scored")}
    vocab: dict[str, int] = {}

    def vid(text: str) -> int:
        return vocab.setdefault(text, len(vocab))

    scored_rows = [i for i in order if col["scored"][i]]
    n = len(scored_rows)
    # Rows of each candidate's table in the same order (their tables list the same positions).
    aligned: dict[str, list[int]] = {}
    for label in labels:
        t = per_label[label]
        index = {
            (u, p): i
            for i, (u, p) in enumerate(
                zip(t["unit"].to_pylist(), t["position"].to_pylist(), strict=True)
            )
        }
        aligned[label] = [index[(units[i], positions[i])] for i in scored_rows]
    keys = [(col["doc_id"][i], positions[i]) for i in scored_rows]
    values: dict[str, dict[str, np.ndarray]] = {}
    for label in labels:
        rows = np.array([lookup[label].get(k, -1) for k in keys], dtype=np.int64)
        got = {}
        for name in _READ:
            arr = columns[label][name]
            picked = arr[np.clip(rows, 0, max(len(arr) - 1, 0))] if len(arr) else np.full(n, np.nan)
            got[name] = np.where(rows >= 0, picked, np.nan)
        p = np.exp(-got["nll_reference"])
        q = np.exp(-got["nll_candidate"])
        got["delta_p"] = np.abs(q - p)
        values[label] = got

    # Top-5 lists: vocabulary indices and probabilities, five per scored token.
    def top5(label: str, side: str) -> tuple[np.ndarray, np.ndarray]:
        t = per_label[label]
        tok = t[f"{side}_top5_tokens"].to_pylist()
        prob = t[f"{side}_top5_probs"].to_pylist()
        ids = np.zeros((n, 5), dtype=np.int64)
        probs = np.full((n, 5), np.nan)
        for r, i in enumerate(aligned[label]):
            for k, (s, pr) in enumerate(zip(tok[i] or [], prob[i] or [], strict=True)):
                ids[r, k] = vid(s)
                probs[r, k] = np.nan if pr is None else pr
        return ids, probs

    tok_index = np.array([vid(col["token"][i]) for i in scored_rows], dtype=np.int64)
    ref_ids, ref_probs = top5(labels[0], "reference")
    cand_tops = [top5(label, "candidate") for label in labels]
    edges = {label: {m: log_edges(values[label][m]) for m, _ in METRICS} for label in labels}
    diff_edges = {}
    if len(labels) > 1:
        for m, _ in METRICS:
            stack = np.stack([values[label][m] for label in labels])
            with np.errstate(invalid="ignore"):
                spread = np.nanmax(stack, 0) - np.nanmin(stack, 0)
            diff_edges[m] = log_edges(spread)
    # Document text: scored tokens shaded by the first candidate's KL; context plain.
    shades = shade(values[labels[0]]["kl"], edges[labels[0]]["kl"])
    parts: list[str] = []
    documents: list[dict[str, Any]] = []
    scored_at = 0
    current = None
    unit_start: list[int] = []
    for i in order:
        u = units[i]
        if u != current:
            if current is not None:
                parts.append("</div></div>")
            current = u
            unit_start.append(scored_at)
            documents.append({"unit": u, "doc_id": col["doc_id"][i], "first": scored_at})
            parts.append(
                f'<div class="tv-doc" id="tv-u{u}"><h3>{noun} {u}</h3>'
                f'<div class="tv-text" data-unit="{u}">'
            )
        text = _token_html(col["token"][i])
        if col["scored"][i]:
            s = int(shades[scored_at])
            cls = f"t s{s}" if s >= 0 else "t nf"
            parts.append(f'<span class="{cls}" id="tv-t{scored_at}">{text}</span>')
            scored_at += 1
        else:
            parts.append(f'<span class="c">{text}</span>')
    if current is not None:
        parts.append("</div></div>")
    per_unit = Counter(units)
    for k, d in enumerate(documents):
        end = documents[k + 1]["first"] if k + 1 < len(documents) else n
        d["scored"] = end - d["first"]
        d["tokens"] = per_unit[d["unit"]]
        kl = values[labels[0]]["kl"][d["first"] : end]
        finite = np.where(np.isnan(kl), -np.inf, kl)
        worst = np.argsort(-finite, kind="stable")[: min(WORST_LINKS, end - d["first"])]
        d["mean"] = number(float(np.nanmean(np.minimum(kl, 1e30)))) if kl.size else "–"
        d["worst"] = [
            {"index": d["first"] + int(w), "kl": number(float(kl[w]))}
            for w in worst
            if np.isfinite(finite[w]) or np.isposinf(finite[w])
        ]
        d["label"] = f"{noun} {d['unit']}"
    data = (
        "{"
        + f'"candidates":{_safe_json(labels)},'
        + f'"metrics":{_safe_json([m for m, _ in METRICS])},'
        + f'"labels":{_safe_json(dict(METRICS))},'
        + f'"noun":{_safe_json(noun)},'
        + f'"vocab":{_safe_json(list(vocab))},'
        + f'"units":{_ints(np.array([d["unit"] for d in documents]))},'
        + f'"starts":{_ints(np.array(unit_start))},'
        + f'"pos":{_ints(np.array([positions[i] for i in scored_rows]))},'
        + f'"tok":{_ints(tok_index)},'
        + f'"rt":{_ints(ref_ids.reshape(-1))},'
        + f'"rp":{_rounded(ref_probs.reshape(-1), 4)},'
        + f'"edges":{_safe_json(edges)},'
        + f'"diff_edges":{_safe_json(diff_edges)},'
        + '"c":['
        + ",".join(
            "{"
            # NLLs to 5 digits: p = exp(-nll) then stays within 1e-4 of the stored value.
            + ",".join(
                f'"{m}":{_rounded(values[label][m], 5 if m.startswith("nll") else 4)}'
                for m in _READ
            )
            + f',"ct":{_ints(cand_tops[k][0].reshape(-1))}'
            + f',"cp":{_rounded(cand_tops[k][1].reshape(-1), 4)}'
            + "}"
            for k, label in enumerate(labels)
        )
        + "]}"
    )
    e = edges[labels[0]]["kl"]
    legend = [("s0", f"< {number(e[0], 2)}")] + [
        (f"s{k + 1}", f"{number(e[k], 2)}–{number(e[k + 1], 2)}") for k in range(SHADES)
    ]
    shown_tokens = len(order)
    compute = run.results.get("compute", {}) or {}
    how = (
        f"a random sample of {noun}s"
        if compute.get("view_docs") == "sample"
        else f"the worst {noun}s by mean KL"
    )
    cap_note = (
        f"Showing {len(documents)} of the {recorded} {noun}s recorded at compare time "
        f"(--view-tokens {compute.get('view_tokens', '?')} kept {how}), {shown_tokens:,} "
        "tokens of which "
        f"{n:,} scored, for {len(labels)} candidate{'s' if len(labels) > 1 else ''}. "
        f"The page embeds at most {max_tokens:,} tokens (lmkl report --view-max-tokens)."
    )
    return TokenView(
        run_name=run.name,
        candidates=labels,
        documents=documents,
        text_html="".join(parts),
        data_json=data,
        legend=legend,
        cap_note=cap_note,
        script=view_script(),
    )


def _token_html(text: str) -> str:
    """A token's text, escaped; a newline token gets a visible ↵ before its line break."""
    if text == "":
        return "∅"
    escaped = html.escape(text, quote=True)
    return escaped.replace("\n", "↵\n") if text.strip() == "" and "\n" in text else escaped


def report_token_view(
    report: Any, required: bool, docs: list[int] | None, max_tokens: int
) -> TokenView | None:
    """The token view of the first of the report's runs that recorded one (None if none did;
    a one-line error when ``required`` or ``docs`` ask for it)."""
    runs = [run for run in report.runs if has_view(run)]
    if not runs:
        if required or docs:
            names = ", ".join(str(r.path) for r in report.runs)
            raise OutputError(
                f"run '{names}' recorded no token view (no view.parquet)",
                "rerun the comparison with --view-tokens N (e.g. 20000)",
            )
        return None
    return build_token_view(runs[0], docs, max_tokens)
