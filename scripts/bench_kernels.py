"""Each per-token kernel's error against float64 and its speed, side by side.

    python scripts/bench_kernels.py            # writes scripts/results/bench_kernels.{json,md}
    python scripts/bench_kernels.py --quick    # a smaller vocabulary and fewer rows

The kernels are the ones lmkl runs (the native C kernel, the torch kernel eager and through
``torch.compile``, the float64 definition) and, for contrast, the textbook formulas in plain
float32 (what the torch path computed before the accuracy contract). The rows are a reference
against a candidate off by a small noise per logit: near-identical models, per-token KL from
1e-5 down to 1e-10 nats. Errors are relative to SciPy float64 on the same float32 logits; speed
is the best of a few calls, in nanoseconds per token x vocabulary entry, on this machine's
threads (an in-process figure: it explains the KL stage's share of a whole run, which
``scripts/bench.py`` times as a process).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import special

from lmkl.scoring import native
from lmkl.scoring.accuracy import CONTRACT
from lmkl.scoring.divergence import token_metrics
from lmkl.scoring.fused import MetricsKernel

HERE = Path(__file__).resolve().parent
NOISE = {"1e-5": 4.5e-3, "1e-7": 4.5e-4, "1e-9": 4.5e-5, "1e-10": 1.5e-5}


def float64_kl(ref: torch.Tensor, cand: torch.Tensor) -> np.ndarray:
    lp = special.log_softmax(ref.double().numpy(), -1)
    lq = special.log_softmax(cand.double().numpy(), -1)
    return special.rel_entr(np.exp(lp), np.exp(lq)).sum(-1)


def plain_float32(ref: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor) -> dict:
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    return {"kl": (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)}


def kernels() -> dict:
    out = {}
    if native.load_native_kernel() is not None:
        out["native C"] = MetricsKernel(device="cpu")
    out["torch eager"] = MetricsKernel(device="cpu", native=False, compile=False)
    out["torch compiled"] = MetricsKernel(device="cpu", native=False, compile=True)
    out["float64 definition"] = token_metrics
    out["plain float32 (before)"] = plain_float32
    return out


def seconds(fn, *args, repeats: int = 3) -> float:
    fn(*args)  # warm (and compile)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    vocab, rows = (32_000, 64) if args.quick else (128_256, 128)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(rows, vocab, generator=gen) * 3
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    cases = {
        level: base + noise * torch.randn(rows, vocab, generator=gen) + 1.0
        for level, noise in NOISE.items()
    }
    truth = {level: float64_kl(base, cand) for level, cand in cases.items()}
    report = {
        "vocab": vocab,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "contract_kl_rtol": CONTRACT["kl"].rtol,
        "kernels": {},
    }
    for name, kernel in kernels().items():
        entry = {"error": {}}
        for level, cand in cases.items():
            got = kernel(base, cand, targets)["kl"].double().numpy()
            rel = np.abs(got - truth[level]) / truth[level]
            entry["error"][level] = {
                "mean_kl_rel": float(abs(got.mean() / truth[level].mean() - 1)),
                "p99_rel": float(np.quantile(rel, 0.99)),
                "max_rel": float(rel.max()),
            }
        elapsed = seconds(kernel, base, cases["1e-9"], targets)
        entry["ns_per_entry"] = elapsed / (rows * vocab) * 1e9
        report["kernels"][name] = entry
        print(name, json.dumps(entry))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = "bench_kernels_quick" if args.quick else "bench_kernels"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    levels = list(NOISE)
    lines = [
        f"V={vocab:,}, {rows} tokens per call, {report['threads']} threads ({report['machine']})."
        " Per-token KL relative error against float64 SciPy (p99 / max) at each KL level.",
        "",
        "| kernel | " + " | ".join(f"KL≈{lv}" for lv in levels) + " | ns / token×entry |",
        "|---|" + "---|" * (len(levels) + 1),
    ]
    for name, entry in report["kernels"].items():
        cells = [
            f"{entry['error'][lv]['p99_rel']:.1e} / {entry['error'][lv]['max_rel']:.1e}"
            for lv in levels
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['ns_per_entry']:.2f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
