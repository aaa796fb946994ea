"""What a whole ``lmkl attribute`` costs, as a multiple of one ``lmkl compare`` (not a test).

Both commands run as a user runs them, each a fresh process, on the demo models (``lmkl demo``'s
cached build: a 4-layer Llama reference and its held-out documents) with the candidate
``--quantize torchao:int4_weight_only:g32`` (a 4-bit copy of the reference, quantized while
loading). Each command runs ``--repeat`` times and the fastest is kept (wall and CPU time of
the child process; CPU time is steadier on a shared machine). Also recorded: the scoring time
each run reports (loading and writing excluded), the attribution's decoder-layer calls against
the calls one full forward per unit would make, and the attribution's terminal output.

Usage::

    python scripts/bench_attribution.py [--repeat 2] [--scheme torchao:int4_weight_only:g32]

Writes ``scripts/results/bench_attribution.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``argv``; its wall time, CPU time (user + system of the child) and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stdout": proc.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--scheme", default="torchao:int4_weight_only:g32")
    args = parser.parse_args()

    from lmkl.demo.names import resolve_demo_value

    reference = resolve_demo_value("demo:reference")
    data = resolve_demo_value("demo:heldout")
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(ROOT))
    lmkl = [sys.executable, "-m", "lmkl"]
    common = [reference, "--quantize", args.scheme, "--data", data, "--overwrite"]
    best: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lmkl-bench-attr-") as work:
        for _ in range(args.repeat):
            for command in ("compare", "attribute"):
                out = Path(work) / command
                extra = ["--quiet"] if command == "compare" else []
                run = timed([*lmkl, command, *common, "--out", str(out), *extra], env)
                if command not in best or run["cpu_s"] < best[command]["cpu_s"]:
                    best[command] = run
                    results[command] = json.loads((out / "results.json").read_text())
    attribution, comparison = results["attribute"], results["compare"]
    assert attribution["full"] == comparison["candidates"][0]["metrics"]
    cost = attribution["cost"]
    units = attribution["units"]
    report = {
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "models": {
            "reference": attribution["reference"].get("architecture"),
            "parameters": attribution["reference"].get("parameters"),
            "candidate": attribution["candidate"]["label"],
            "decoder_layers": len(attribution["layers"]),
        },
        "tokens": attribution["full"]["counts"]["tokens"],
        "units": len(units),
        "units_scored": sum(1 for u in units if not u["identical"]),
        "repeat": args.repeat,
        "compare": {k: best["compare"][k] for k in ("wall_s", "cpu_s")}
        | {"scoring_s": comparison["throughput"]["seconds"]},
        "attribute": {k: best["attribute"][k] for k in ("wall_s", "cpu_s")}
        | {"scoring_s": attribution["throughput"]["seconds"]},
        "layer_calls": cost["layer_calls"],
        "full_forward_layer_calls": cost["full_forward_layer_calls"],
        "full_kl": attribution["full_kl"],
        "summary": attribution["summary"],
        "terminal": best["attribute"]["stdout"],
    }
    for key in ("wall_s", "cpu_s", "scoring_s"):
        report[f"multiple_{key}"] = report["attribute"][key] / report["compare"][key]
    report["layer_call_share"] = cost["layer_calls"] / cost["full_forward_layer_calls"]
    results_dir = ROOT / "scripts" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "bench_attribution.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# lmkl attribute vs lmkl compare (demo models)",
        "",
        f"{report['models']['reference']} reference, {report['models']['decoder_layers']} decoder "
        f"layers, candidate {report['models']['candidate']}; {report['tokens']} scored tokens; "
        f"{report['units']} units ({report['units_scored']} scored). Fastest of {args.repeat}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}.",
        "",
        "| | compare | attribute | multiple |",
        "|---|---:|---:|---:|",
    ]
    for key, name in (("wall_s", "whole process, wall s"), ("cpu_s", "whole process, CPU s"),
                      ("scoring_s", "scoring only, s")):  # fmt: skip
        lines.append(
            f"| {name} | {report['compare'][key]:.1f} | {report['attribute'][key]:.1f} | "
            f"{report[f'multiple_{key}']:.2f}× |"
        )
    lines += [
        "",
        f"Decoder layer calls: {cost['layer_calls']:,.0f}, "
        f"{report['layer_call_share']:.0%} of the {cost['full_forward_layer_calls']:,.0f} that "
        "one full forward per unit would make.",
        "",
        "```",
        report["terminal"].rstrip(),
        "```",
    ]
    (results_dir / "bench_attribution.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
