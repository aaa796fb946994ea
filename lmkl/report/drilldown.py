"""Terminal drill-down into one run (``lmkl inspect``): a document coloured by per-token KL and
the worst positions with both models' top-5 next tokens.

All data text is put into rich ``Text`` objects (never parsed as markup), so a document
containing ``[bold]`` or control-like text prints as itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from lmkl.analysis.per_token import CandidateTokens
from lmkl.engine.rundir import load_tokens
from lmkl.errors import OutputError, UsageError
from lmkl.formatting import format_column, format_percent, format_value, to_float
from lmkl.report.candidates import worst_entries
from lmkl.report.runs import RunInfo, experiment_datasets, load_run, read_candidate_tokens
from lmkl.report.tables import table_title
from lmkl.report.token_strings import TokenNamer, visible

#: Styles from calm to alarming; thresholds are the candidate's own median, p90 and p99 KL.
LEVEL_STYLES = ("default", "yellow", "bold dark_orange", "bold white on red3")
LEVEL_NAMES = ("≤ median", "median–p90", "p90–p99", "> p99")


@dataclass
class DocumentView:
    """The scored tokens of one document for one candidate, in order."""

    doc_id: int
    positions: np.ndarray
    token_ids: np.ndarray
    kl: np.ndarray
    texts: list[str]
    first_shown: int
    total: int


def pick_candidate(run: RunInfo, label: str | None) -> str:
    """The candidate label to inspect (the first one by default)."""
    labels = [str(c.get("label")) for c in run.results.get("candidates", [])]
    if not labels:
        raise UsageError(f"run '{run.path}' has no candidates", "pass another run directory")
    if label is None:
        return labels[0]
    if label not in labels:
        raise UsageError(
            f"no candidate '{label}' in run '{run.path}'", "use one of: " + ", ".join(labels)
        )
    return label


def pick_dataset(run: RunInfo, name: str | None) -> RunInfo:
    """The run to inspect: ``run`` itself, or for an experiment root one of its datasets (the
    only one, or the one named ``name``; a usage error listing them otherwise)."""
    if not run.is_experiment:
        if name is not None:
            raise UsageError(
                f"--dataset is for experiment directories; '{run.path}' is a single run",
                "drop --dataset",
            )
        return run
    subs = experiment_datasets(run)
    if not subs:
        raise OutputError(
            f"experiment '{run.path}' has no finished dataset runs under datasets/",
            "rerun it with `lmkl run`, or --resume it",
        )
    names = ", ".join(sub.name for sub in subs)
    if name is None:
        if len(subs) == 1:
            return subs[0]
        raise UsageError(
            f"experiment '{run.path}' has {len(subs)} datasets and inspect shows one",
            f"pass --dataset NAME, one of: {names}",
        )
    for sub in subs:
        if name in (sub.name, sub.path.name):
            return sub
    raise UsageError(f"no dataset '{name}' in experiment '{run.path}'", f"use one of: {names}")


def thresholds(run: RunInfo, label: str) -> tuple[float, float, float]:
    entry = next(c for c in run.results["candidates"] if c.get("label") == label)
    kl = entry.get("metrics", {}).get("kl", {})
    return to_float(kl.get("median")), to_float(kl.get("p90")), to_float(kl.get("p99"))


def level(value: float, cuts: tuple[float, float, float]) -> int:
    """0..3: which of the candidate's KL quantile bands ``value`` falls in (NaN → 0)."""
    if math.isnan(value):
        return 0
    return int(sum(value > c for c in cuts if math.isfinite(c)))


def document_view(
    run: RunInfo,
    label: str,
    doc_id: int,
    namer: TokenNamer,
    max_tokens: int = 400,
    focus: int | None = None,
) -> DocumentView:
    """Read one document's rows of tokens.parquet (pushed-down filter), ordered by position.

    When the document has more than ``max_tokens`` scored tokens, a slice of that many around
    ``focus`` (a position; default the document's highest-KL token) is kept.
    """
    path = run.path / "tokens.parquet"
    if not path.exists():
        raise UsageError(f"run '{run.path}' has no tokens.parquet", "rerun the comparison")
    table = load_tokens(
        run.path,
        columns=["position", "token_id", "kl"],
        filters=[("candidate", "=", label), ("doc_id", "=", int(doc_id))],
    )
    if table.num_rows == 0:
        docs = load_tokens(run.path, columns=["doc_id"], filters=[("candidate", "=", label)])
        ids = pc.unique(docs["doc_id"]).to_numpy()
        span = f"{ids.min()}–{ids.max()}" if ids.size else "none"
        raise UsageError(
            f"document {doc_id} has no scored tokens for candidate '{label}'",
            f"pass --doc with a document id in {span}",
        )
    positions = table["position"].to_numpy()
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    token_ids = table["token_id"].to_numpy()[order]
    kl = pc.fill_null(table["kl"], math.nan).to_numpy().astype(np.float64)[order]
    total = positions.size
    start = 0
    if total > max_tokens:
        finite = np.where(np.isfinite(kl), kl, -1.0)
        centre = (
            int(np.searchsorted(positions, focus))
            if focus is not None
            else int(np.argmax(np.where(np.isposinf(kl), np.inf, finite)))
        )
        start = int(np.clip(centre - max_tokens // 2, 0, total - max_tokens))
        positions, token_ids, kl = (
            a[start : start + max_tokens] for a in (positions, token_ids, kl)
        )
    return DocumentView(
        doc_id=int(doc_id),
        positions=positions,
        token_ids=token_ids,
        kl=kl,
        texts=namer.many(token_ids.tolist()),
        first_shown=start,
        total=total,
    )


#: Without colour (output piped to a file, NO_COLOR) the marked token is put in these brackets.
PLAIN_MARK = ("⟦", "⟧")


def marked(token: str, plain: bool) -> str:
    """``token`` as the highlighted one: unchanged where colour shows it, else in brackets."""
    return f"{PLAIN_MARK[0]}{token}{PLAIN_MARK[1]}" if plain else token


def render_document(
    view: DocumentView, cuts: tuple[float, float, float], readable: bool, plain: bool = False
) -> Text:
    """The document's text with each token coloured by its KL band; ``plain`` (no colour)
    brackets the tokens above the candidate's p99 instead, so they still stand out."""
    text = Text()
    if view.first_shown > 0:
        text.append("… ", style="dim")
    for token, value in zip(view.texts, view.kl, strict=True):
        shown = token if readable else f"⟨{token}⟩"
        band = level(float(value), cuts)
        shown = marked(shown, plain and band == len(cuts))
        text.append(shown, style=LEVEL_STYLES[band])
    if view.first_shown + view.positions.size < view.total:
        text.append(" …", style="dim")
    return text


def legend(cuts: tuple[float, float, float], plain: bool = False) -> Text:
    if plain:
        return Text(
            f"{marked('token', True)} = per-token KL(P‖Q) above the candidate's p99 "
            f"({format_value(cuts[2], 3)}); without colour the other bands are not marked",
            style="dim",
        )
    text = Text("colour = per-token KL(P‖Q): ", style="dim")
    low, mid, high = format_column(cuts, 3)
    bounds = [f"≤ {low}", f"{low}–{mid}", f"{mid}–{high}", f"> {high}"]
    for style, name, bound in zip(LEVEL_STYLES, LEVEL_NAMES, bounds, strict=True):
        text.append(f" {name} ({bound}) ", style=style)
        text.append(" ")
    return text


def documents_table(tokens: CandidateTokens, n: int = 8) -> Table:
    """The documents with the highest mean KL (bincount over doc ids)."""
    keep = tokens.finite
    docs = tokens.doc_id[keep]
    counts = np.bincount(docs)
    sums = np.bincount(docs, weights=tokens.kl[keep])
    present = np.flatnonzero(counts)
    means = sums[present] / counts[present]
    order = present[np.argsort(-means, kind="stable")[:n]]
    table = Table(title="documents with the highest mean KL", title_justify="left")
    for name in ("doc", "tokens", "mean KL", "max KL"):
        table.add_column(name, justify="right")
    maxima = np.full(counts.size, -np.inf)
    np.maximum.at(maxima, docs, tokens.kl[keep])
    # Significant digits that keep the documents apart (a quantized candidate's KL is ~1e-5).
    mean_texts = format_column(sums[order] / counts[order])
    max_texts = format_column(maxima[order])
    for d, mean_text, max_text in zip(order, mean_texts, max_texts, strict=True):
        table.add_row(str(d), f"{counts[d]:,}", mean_text, max_text)
    return table


def _top5(items: list[dict[str, Any]], plain: bool = False) -> Text:
    text = Text()
    for i, item in enumerate(items):
        if i:
            text.append(", ")
        target = bool(item.get("is_target"))
        token = marked(visible(str(item.get("token", "")), 14), plain and target)
        text.append(token, style="bold red" if target else None)
        prob = item.get("prob", math.nan)
        # Three significant digits: a small probability reads 0.0412%, never 0%.
        text.append(f" {format_percent(prob)}" if math.isfinite(prob) else " –", style="dim")
    return text


def worst_table(
    entries: list[dict[str, Any]], label: str, plain: bool = False, doc: int | None = None
) -> Table:
    """The worst positions: KL, where, the context ending in the divergent token, both top-5s.

    ``plain`` (no colour): the next token and the actual token in the top-5 lists are put in
    brackets, which piped output keeps. ``doc``: the entries are those of that document."""
    marks = (
        f"next token {marked('in brackets', True)}, also in the top-5 lists"
        if plain
        else "next token in red; top-5 entries in bold red are the actual token"
    )
    table = Table(
        title=table_title(
            f"worst {len(entries)} tokens of ",
            label,
            f" in document {doc}" if doc is not None else "",
            f" ({marks})",
        ),
        title_justify="left",
        show_lines=True,
    )
    table.add_column("#", justify="right")
    table.add_column("KL", justify="right", style="bold")
    table.add_column("doc:pos", justify="right")
    table.add_column("context → next token", ratio=3, overflow="fold")
    table.add_column("reference top-5", ratio=2)
    table.add_column("candidate top-5", ratio=2)
    for rank, e in enumerate(entries, 1):
        context = str(e.get("context") or "").replace("\n", "↵ ")
        context = ("…" + context[-90:]) if len(context) > 90 else context
        cell = Text(context)
        cell.append(marked(visible(str(e.get("token") or "")), plain), style="bold white on red3")
        kl = e.get("kl", math.nan)
        table.add_row(
            str(rank),
            format_value(kl),
            f"{e.get('doc_id')}:{e.get('position')}",
            cell,
            _top5(e.get("reference_top5") or [], plain),
            _top5(e.get("candidate_top5") or [], plain),
        )
    return table


def inspect_run(
    run_dir: Path,
    *,
    doc: int | None = None,
    worst: int = 10,
    candidate: str | None = None,
    max_tokens: int = 400,
    console: Console | None = None,
    dataset: str | None = None,
) -> None:
    """Print the drill-down of one run to ``console``; for an experiment root, of one of its
    datasets (``dataset``, needed when it has several).

    Without colour (piped, ``NO_COLOR``) the highlighted tokens are put in brackets."""
    console = console or Console()
    root = load_run(Path(run_dir))
    run = pick_dataset(root, dataset)
    label = pick_candidate(run, candidate)
    cuts = thresholds(run, label)
    namer = TokenNamer([run])
    tokens = read_candidate_tokens(run.path, [label]).get(label)
    chosen = doc
    # With --doc, the worst positions of that document: worst.json keeps the run's worst
    # positions with their top-5 lists, so those of the document are picked from all of them.
    entries = worst_entries(
        run, label, len(run.worst) if doc is not None else max(worst, 1), tokens
    )
    if tokens is None and not entries:
        raise OutputError(
            f"'{run.path}' holds neither tokens.parquet nor worst positions (worst.json) "
            f"for candidate '{label}'",
            "rerun the comparison; both are written unless switched off",
        )
    # Piped (no colour system) or NO_COLOR: colour cannot mark the tokens, brackets do.
    plain = console.color_system is None or console.no_color
    head = Text()
    head.append(f"{label}", style="bold")
    where = f"dataset {run.name} of {root.path}" if run is not root else str(run.path)
    head.append(f" (candidate) vs {run.reference_label} (reference) · {where}", style="dim")
    parts: list[Any] = [head]
    if tokens is not None and doc is None:
        parts.append(documents_table(tokens))
    focus = None
    if doc is None:
        if entries:
            doc, focus = int(entries[0]["doc_id"]), int(entries[0]["position"])
        elif tokens is not None and tokens.kl.size:
            doc = int(tokens.doc_id[int(np.nanargmax(tokens.kl))])
    if doc is not None and tokens is not None:
        view = document_view(run, label, doc, namer, max_tokens=max_tokens, focus=focus)
        shown = view.positions.size
        title = Text(f"document {view.doc_id}: ", style="bold")
        title.append(
            f"{shown:,} of {view.total:,} scored tokens"
            + (f" (from token {view.positions[0]})" if view.first_shown else ""),
            style="dim",
        )
        if namer.source != "tokenizer":
            title.append(
                " · token strings: "
                + ("worst.json where known, else ids" if namer.source == "worst.json" else "ids"),
                style="dim",
            )
        parts += [
            Text(""),
            title,
            legend(cuts, plain),
            render_document(view, cuts, readable=namer.source == "tokenizer", plain=plain),
        ]
    if worst > 0:
        if chosen is not None:
            entries = [e for e in entries if int(e.get("doc_id", -1)) == chosen]
        parts += [
            Text(""),
            worst_table(entries[:worst], label, plain, chosen)
            if entries
            else Text(
                f"none of the run's stored worst positions (worst.json) is in document {chosen}"
                if chosen is not None
                else "no worst positions stored (worst.json)",
                style="dim",
            ),
        ]
    console.print(Group(*parts))
