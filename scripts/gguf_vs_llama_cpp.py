"""GGUF quantizations scored by lmkl (dequantized weights) and by llama.cpp's own runtime.

Optional peer measurement, never run in CI: it needs a llama.cpp build (``llama-perplexity``).
It builds the tests' tiny Llama (a trained 2-layer, 64-wide model with a byte-level BPE
tokenizer), writes it as GGUF files with the ``gguf`` package (F32, F16, Q8_0, Q4_0), and on
the same text, in llama-perplexity's windowing:

* lmkl: ``lmkl compare REF ref-F16.gguf ref-Q8_0.gguf ref-Q4_0.gguf --windowing llama-cpp``
  (transformers dequantizes each GGUF; every matmul runs in float32);
* llama.cpp: a base pass on the F32 GGUF (``--kl-divergence-base``), then one
  ``--kl-divergence`` pass per quantized file (its CPU kernels also round the activations,
  to Q8_0/Q8_1 blocks for quantized dot products).

The difference between the two mean KLs per type is what the README's Quantization section
reports: lmkl measures the error of the quantized weights; llama.cpp measures its runtime.

Usage::

    python scripts/gguf_vs_llama_cpp.py --llama-perplexity /path/to/llama-perplexity

Writes ``scripts/results/gguf_vs_llama_cpp.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_llama_cpp import llama_kld_stats  # noqa: E402  (this folder: the shared parser)

TYPES = ("F16", "Q8_0", "Q4_0")
CONTEXT = 128


def _llama_options(threads: int) -> list[str]:
    # One sequence per batch, like lmkl's windows; no weight repacking: llama.cpp's repacked
    # Q4_0/Q8_0 CPU kernels crash (SIGSEGV/SIGILL) on the tiny model's 64-wide rows.
    return ["-c", str(CONTEXT), "-b", str(CONTEXT), "-t", str(threads), "--no-repack"]


def _llama_kld(binary: str, model: Path, text: Path, base: Path, threads: int) -> dict:
    """One llama-perplexity KL-divergence pass; its mean KLD and timing."""
    kld_args = ["--kl-divergence-base", str(base), "--kl-divergence"]
    start = time.perf_counter()
    proc = subprocess.run(
        [binary, "-m", str(model), "-f", str(text), *_llama_options(threads), *kld_args],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    stats = llama_kld_stats(proc.stdout + proc.stderr)
    if "mean" not in stats:
        raise RuntimeError(f"no 'Mean KLD' in llama-perplexity's output:\n{proc.stderr[-2000:]}")
    return {
        "kl_mean": stats["mean"],
        "kl_se": stats.get("mean_se"),
        "same_top_percent": stats.get("same_top_percent"),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-perplexity", required=True, help="path of the llama.cpp binary")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args()

    from gguf_files import write_gguf
    from tiny_models import build_tiny_model

    from lmkl.demo.assets import demo_corpus

    work = args.work or Path(tempfile.mkdtemp(prefix="lmkl-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "reference"
    if not (reference / "config.json").exists():
        build_tiny_model(reference, hidden_size=64, num_layers=2, num_heads=4, steps=60, seed=1)
    files = {t: write_gguf(reference, work / f"ref-{t}.gguf", t) for t in ("F32", *TYPES)}
    text = work / "text.txt"
    text.write_text("\n\n".join(demo_corpus()[1]), encoding="utf-8")

    # llama.cpp: base logits from the F32 file, then one KLD pass per type.
    base = work / "base.dat"
    base_args = [*_llama_options(args.threads), "--kl-divergence-base", str(base)]
    start = time.perf_counter()
    subprocess.run(
        [args.llama_perplexity, "-m", str(files["F32"]), "-f", str(text), *base_args],
        capture_output=True,
        text=True,
        check=True,
    )
    base_seconds = time.perf_counter() - start
    llama = {
        t: _llama_kld(args.llama_perplexity, files[t], text, base, args.threads) for t in TYPES
    }

    # lmkl: the HF original as reference, every GGUF as a candidate, in one command.
    run = work / "lmkl-run"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lmkl", "compare", str(reference)]
        + [str(files[t]) for t in ("F32", *TYPES)]
        + ["--data", str(text), "--windowing", "llama-cpp", "--context-length", str(CONTEXT)]
        + ["--out", str(run), "--overwrite", "--quiet", "--device", "cpu"],
        check=True,
        capture_output=True,
        text=True,
    )
    lmkl_seconds = time.perf_counter() - start
    results = json.loads((run / "results.json").read_text())
    ours = {c["label"].removeprefix("ref-"): c for c in results["candidates"]}

    rows = []
    for t in TYPES:
        kl = ours[t]["metrics"]["kl"]
        rows.append(
            {
                "type": t,
                "bits_per_weight": ours[t]["model"]["bits_per_weight"],
                "lmkl_kl_mean": kl["mean"],
                "lmkl_kl_se": kl["se"],
                "llama_cpp_kl_mean": llama[t]["kl_mean"],
                "llama_cpp_kl_se": llama[t]["kl_se"],
                "ratio_llama_cpp_over_lmkl": llama[t]["kl_mean"] / kl["mean"],
                "lmkl_top1_agreement": ours[t]["metrics"]["top1_agreement"]["mean"],
                "llama_cpp_same_top_percent": llama[t]["same_top_percent"],
            }
        )
    figures = {
        "model": "tests' tiny Llama: 2 layers x 64, vocabulary 512, trained 60 steps",
        "text": f"demo held-out documents, {text.stat().st_size} bytes",
        "context": CONTEXT,
        "scored_tokens_lmkl": results["data"]["scored_tokens"],
        "f32_gguf_kl_mean_lmkl": ours["F32"]["metrics"]["kl"]["mean"],
        "rows": rows,
        "seconds": {
            "lmkl_whole_command": lmkl_seconds,
            "llama_cpp_base": base_seconds,
            "llama_cpp_kld": {t: llama[t]["seconds"] for t in TYPES},
        },
    }
    out_dir = ROOT / "scripts" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gguf_vs_llama_cpp.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        "| GGUF type | bits/weight | lmkl mean KL (dequantized weights) | llama.cpp mean KLD "
        "(its runtime) | llama.cpp / lmkl |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['bits_per_weight']:.2f} | {r['lmkl_kl_mean']:.3g} ± "
            f"{r['lmkl_kl_se']:.1g} | {r['llama_cpp_kl_mean']:.3g} ± {r['llama_cpp_kl_se']:.1g} "
            f"| {r['ratio_llama_cpp_over_lmkl']:.2f} |"
        )
    lines.append(
        f"\nF32 GGUF vs the Hugging Face original in lmkl: mean KL "
        f"{figures['f32_gguf_kl_mean_lmkl']:.2g}; {figures['scored_tokens_lmkl']} scored tokens, "
        f"context {CONTEXT}."
    )
    lines.append(
        "llama.cpp prints its mean KLD with 6 decimals, so its smallest figures are rounded."
    )
    (out_dir / "gguf_vs_llama_cpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
