"""Benchmark: the report's token view with 50,000 tokens (target: the page opens in < 2 s).

Synthesises a run directory (tests/synthetic.py) and a matching view.parquet (as
`lmkl compare --view-tokens 50000` writes it: every position of the shown documents, top-5
lists of both models), writes `lmkl report RUN --view tokens` and opens the page in headless
chromium with Playwright, timing the load event and the moment the view's script is ready
(tooltips, switching). Also times one metric switch (re-shading every token).

    python scripts/bench_token_view.py                     # 50,000 tokens, 1 candidate
    python scripts/bench_token_view.py --candidates 3

Figures go to scripts/results/bench_token_view.json (one entry per parameter set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic-run builder lives with the test fixtures

from synthetic import WORDS, SyntheticCandidate, synthesize_run  # noqa: E402

from lmkl.engine.view_record import VIEW_SCHEMA  # noqa: E402
from lmkl.report.render import write_report  # noqa: E402

TARGET_SECONDS = 2.0
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def synthetic_view(run: Path, seed: int = 0) -> None:
    """view.parquet for every scored token of ``run`` (plus each document's first token)."""
    rng = np.random.default_rng(seed)
    tokens = pq.read_table(run / "tokens.parquet").to_pandas()
    words = [" " + w for w in WORDS] + ["\n", "<0xE2>", "é"]
    out: dict[str, list] = {f.name: [] for f in VIEW_SCHEMA}
    for label, rows in tokens.groupby("candidate", sort=False):
        rows = rows.sort_values(["doc_id", "position"])
        for doc, doc_rows in rows.groupby("doc_id", sort=False):
            positions = doc_rows["position"].tolist()
            ids = doc_rows["token_id"].tolist()
            lead = [(positions[0] - 1, 0)] if positions[0] > 0 else []
            for p, t, scored in [(p, t, False) for p, t in lead] + [
                (p, t, True) for p, t in zip(positions, ids, strict=True)
            ]:
                top = rng.integers(0, len(words), 10)
                probs = np.sort(rng.dirichlet(np.ones(8))[:5])[::-1].astype(np.float32)
                out["candidate"].append(label)
                out["unit"].append(int(doc))
                out["doc_id"].append(int(doc))
                out["window_id"].append(0)
                out["position"].append(int(p))
                out["token_id"].append(int(t))
                out["token"].append(words[int(t) % len(words)])
                out["scored"].append(scored)
                for side, k in (("reference", 0), ("candidate", 5)):
                    ids5 = [int(i) for i in top[k : k + 5]]
                    out[f"{side}_top5_ids"].append(ids5 if scored else None)
                    out[f"{side}_top5_probs"].append(probs.tolist() if scored else None)
                    out[f"{side}_top5_tokens"].append([words[i] for i in ids5] if scored else None)
    pq.write_table(pa.Table.from_pydict(out, schema=VIEW_SCHEMA), run / "view.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--chromium", default=os.environ.get("LMKL_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        cands = [SyntheticCandidate(f"student-{k}", 1.0 + k) for k in range(args.candidates)]
        run = synthesize_run(Path(tmp) / "run", args.tokens, cands, context_length=256)
        synthetic_view(run)
        t0 = time.perf_counter()
        page_path = write_report(
            [run], "html", Path(tmp) / "view.html", view="tokens", view_max_tokens=args.tokens
        )
        report_seconds = time.perf_counter() - t0
        size = page_path.stat().st_size
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=FLAGS)
            loads, readies, switches = [], [], []
            for _ in range(3):
                page = browser.new_page()
                t0 = time.perf_counter()
                page.goto(page_path.as_uri(), wait_until="load")
                loads.append(time.perf_counter() - t0)
                page.wait_for_selector("html[data-token-view=ready]", state="attached")
                readies.append(time.perf_counter() - t0)
                t1 = time.perf_counter()
                page.select_option("#tv-metric", "jsd")
                page.evaluate("() => new Promise(r => requestAnimationFrame(() => r(0)))")
                switches.append(time.perf_counter() - t1)
                spans = page.evaluate("document.querySelectorAll('.tv-text span.t').length")
                page.close()
            browser.close()
    entry = {
        "tokens": args.tokens,
        "candidates": args.candidates,
        "scored_spans": spans,
        "page_bytes": size,
        "report_seconds": round(report_seconds, 2),
        "load_seconds": round(min(loads), 3),
        "ready_seconds": round(min(readies), 3),
        "ready_seconds_worst": round(max(readies), 3),
        "metric_switch_seconds": round(min(switches), 3),
        "target_seconds": TARGET_SECONDS,
        "within_target": max(readies) < TARGET_SECONDS,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "python": platform.python_version(),
    }
    print(json.dumps(entry, indent=2))
    out = ROOT / "scripts" / "results" / "bench_token_view.json"
    entries = json.loads(out.read_text()) if out.exists() else []
    entries = [
        e
        for e in entries
        if (e["tokens"], e["candidates"]) != (entry["tokens"], entry["candidates"])
    ]
    out.write_text(json.dumps([*entries, entry], indent=2) + "\n")


if __name__ == "__main__":
    main()
