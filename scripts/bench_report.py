"""Benchmark: how long `lmkl report` takes on a large run (target: 1M tokens in < 30 s, 2 cores).

Synthesises a valid run directory (results.json + tokens.parquet + worst.json, see
tests/synthetic.py), then times the real command line (`lmkl report RUN --format html`, a fresh
process: imports included) and, in-process, each phase (reading + aggregation, figures, HTML).
Wall time depends on what else runs on the machine, so CPU time and the load average are
recorded too.

    python scripts/bench_report.py                      # 1M tokens, 1 candidate
    python scripts/bench_report.py --tokens 1000000 --candidates 3

Figures go to scripts/results/bench_report.json (a list: one entry per invocation is appended
under its parameters, replacing an earlier entry with the same parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic-run builder lives with the test fixtures

from synthetic import SyntheticCandidate, synthesize_run  # noqa: E402

TARGET_SECONDS = 30.0


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results/bench_report.json")
    parser.add_argument(
        "--keep", type=Path, default=None, help="Write the synthetic run here and keep it."
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lmkl-bench-report-") as tmp:
        run_dir = args.keep or Path(tmp) / "run"
        cands = [
            SyntheticCandidate(
                f"candidate-{i}",
                0.6 + 0.4 * i,
                params=(i + 1) * 10**8,
                step=(i + 1) * 1000,
                group="bench",
            )
            for i in range(args.candidates)
        ]
        t0 = time.perf_counter()
        synthesize_run(run_dir, args.tokens, cands, seed=0, context_length=1024, vocab_size=32_000)
        synth_s = time.perf_counter() - t0
        parquet_mb = (run_dir / "tokens.parquet").stat().st_size / 2**20

        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        timings = {}
        for fmt in ("html", "json"):
            out = Path(tmp) / f"report.{fmt}"
            cpu0, w0 = child_cpu(), time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "lmkl",
                    "report",
                    str(run_dir),
                    "--format",
                    fmt,
                    "--out",
                    str(out),
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
            timings[fmt] = {
                "wall_s": round(time.perf_counter() - w0, 3),
                "cpu_s": round(child_cpu() - cpu0, 3),
                "output_kb": round(out.stat().st_size / 1024, 1),
            }

        # In-process phases (imports already paid).
        from lmkl.report.build import build_report
        from lmkl.report.plots import make_plots
        from lmkl.report.render import render_html

        t0 = time.perf_counter()
        report = build_report([run_dir])
        t1 = time.perf_counter()
        plots = make_plots(report)
        t2 = time.perf_counter()
        render_html(report, plots)
        t3 = time.perf_counter()

    rows = args.tokens * args.candidates
    entry = {
        "benchmark": "lmkl report",
        "tokens": args.tokens,
        "candidates": args.candidates,
        "rows": rows,
        "tokens_parquet_mb": round(parquet_mb, 1),
        "synthesise_s": round(synth_s, 2),
        "cli_html": timings["html"],
        "cli_json": timings["json"],
        "phases_s": {
            "read_and_aggregate": round(t1 - t0, 3),
            "figures": round(t2 - t1, 3),
            "html": round(t3 - t2, 3),
        },
        "target_s": TARGET_SECONDS,
        "meets_target": timings["html"]["wall_s"] < TARGET_SECONDS,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else []
    previous = [
        e
        for e in previous
        if (e.get("tokens"), e.get("candidates")) != (args.tokens, args.candidates)
    ]
    args.out.write_text(json.dumps([*previous, entry], indent=2) + "\n")
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
