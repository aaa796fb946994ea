"""Side by side with llama.cpp's ``llama-perplexity --kl-divergence`` (optional; never run in CI).

The same model pair (lmkl's demo pair, converted to float32 GGUF, so both tools run the same
weights), the same text, the same windowing (``--windowing llama-cpp`` is llama-perplexity's
chunking: n_ctx-token chunks, second half scored), each tool as whole processes on one machine:

* llama.cpp: the base pass (the reference writes its logits file) plus the KLD pass (the
  candidate against that file);
* lmkl: one ``lmkl compare`` process.

It also prints both tools' KL statistics (mean, median, p99, max), which agree to float32
rounding when the windows and tokens agree.

You need a llama.cpp checkout with ``llama-perplexity`` built, for example from the sources in
the ``llama-cpp-python`` sdist (no network needed beyond the package index)::

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build --target llama-perplexity -j2      # about 5-10 minutes on 2 cores

Usage::

    python scripts/bench_llama_cpp.py --llama-cpp path/to/llama.cpp [--ctx 128] [--repeat 3]

Writes ``scripts/results/bench_llama_cpp.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Run in a child: the llama.cpp converter, with two adaptations to lmkl's demo tokenizer (a
#: byte-level BPE whose pre-tokenizer is GPT-2's regex, with no SentencePiece model): its
#: pre-tokenizer is named "gpt-2" (the converter only knows hub tokenizers by hash) and the
#: SentencePiece attempt is skipped (the converter expects FileNotFoundError there).
CONVERT = """
import sys
llama_cpp, model, out = sys.argv[1:4]
sys.path[:0] = [llama_cpp + "/gguf-py", llama_cpp]
import conversion.base as base

def no_sentencepiece(self, *args, **kwargs):
    raise FileNotFoundError("no tokenizer.model")

for obj in list(vars(base).values()):
    if isinstance(obj, type) and "get_vocab_base_pre" in vars(obj):
        obj.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    if isinstance(obj, type) and "_set_vocab_sentencepiece" in vars(obj):
        obj._set_vocab_sentencepiece = no_sentencepiece
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf", model, "--outtype", "f32", "--outfile", out]
convert_hf_to_gguf.main()
"""

LMKL_MAIN = "import sys; from lmkl.cli import main; sys.argv[0] = 'lmkl'; sys.exit(main())"


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds and combined output of one process (raises with its tail on failure)."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def llama_kld_stats(output: str) -> dict[str, float]:
    """KL statistics from llama-perplexity's KLD pass output."""
    stats = {}
    for key, label in (
        ("mean", r"Mean\s+KLD"),
        ("median", r"Median\s+KLD"),
        ("p99", r"99\.0%\s+KLD"),
        ("max", r"Maximum\s+KLD"),
    ):
        match = re.search(label + r":\s+([-+0-9.eE]+)", output)
        if match:
            stats[key] = float(match.group(1))
    se = re.search(r"Mean\s+KLD:\s+[-+0-9.eE]+\s+±\s+([-+0-9.eE]+)", output)
    if se:
        stats["mean_se"] = float(se.group(1))
    same_top = re.search(r"Same top p:\s+([0-9.]+)\s+±", output)
    if same_top:
        stats["same_top_percent"] = float(same_top.group(1))
    return stats


def find_binary(llama_cpp: Path) -> Path:
    for candidate in (llama_cpp / "build" / "bin" / "llama-perplexity", llama_cpp):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit(f"no llama-perplexity binary under '{llama_cpp}' (build it first)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source dir")
    parser.add_argument("--ctx", type=int, default=128, help="n_ctx (llama-cpp windowing)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results")
    parser.add_argument(
        "--text-copies",
        type=int,
        default=1,
        help="score the held-out text this many times over (a longer job: fixed costs matter less)",
    )
    args = parser.parse_args()
    llama_cpp = args.llama_cpp.resolve()
    binary = find_binary(llama_cpp)
    if not (llama_cpp / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"'{llama_cpp}' has no convert_hf_to_gguf.py")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lmkl-llama-cpp-"))
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    from lmkl.demo.assets import build_demo_assets, iter_heldout
    from lmkl.demo.names import demo_cache_dir

    assets = build_demo_assets(demo_cache_dir())
    text = work / "heldout.txt"
    # The held-out documents as one text: both tools read the same bytes as one token stream.
    once = "\n\n".join(iter_heldout(assets.heldout_path))
    text.write_text("\n\n".join([once] * args.text_copies) + "\n")
    ggufs = {}
    for role, model in (("reference", assets.reference_dir), ("candidate", assets.candidate_dir)):
        ggufs[role] = work / f"{role}-f32.gguf"
        if not ggufs[role].exists():
            timed([sys.executable, "-c", CONVERT, str(llama_cpp), str(model), str(ggufs[role])])

    base_file = work / "reference.kld"
    common = ["-c", str(args.ctx), "-t", str(args.threads), "-tb", str(args.threads)]
    llama_base = [str(binary), "-m", str(ggufs["reference"]), "-f", str(text), *common]
    llama_base += ["--kl-divergence-base", str(base_file)]
    llama_kld = [str(binary), "-m", str(ggufs["candidate"]), *common]
    llama_kld += ["--kl-divergence-base", str(base_file), "--kl-divergence"]
    run_dir = work / "lmkl-run"
    lmkl = [
        sys.executable,
        "-c",
        LMKL_MAIN,
        "compare",
        str(assets.reference_dir),
        str(assets.candidate_dir),
        "--data",
        str(text),
        "--windowing",
        "llama-cpp",
        "--context-length",
        str(args.ctx),
        "--out",
        str(run_dir),
        "--overwrite",
        "--quiet",
    ]
    # One untimed round warms the page cache and lmkl's weight-hash memo (a user's second run).
    timed(llama_base)
    timed(llama_kld)
    timed(lmkl, env)
    times: dict[str, list[float]] = {"llama_base": [], "llama_kld": [], "lmkl": []}
    kld_output = ""
    for _ in range(args.repeat):  # interleaved: a burst of load hits both tools alike
        times["llama_base"].append(timed(llama_base)[0])
        wall, kld_output = timed(llama_kld)
        times["llama_kld"].append(wall)
        times["lmkl"].append(timed(lmkl, env)[0])
    results = json.loads((run_dir / "results.json").read_text())
    kl = results["candidates"][0]["metrics"]["kl"]
    best = {k: min(v) for k, v in times.items()}
    llama_total = best["llama_base"] + best["llama_kld"]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "command": f"python scripts/bench_llama_cpp.py --llama-cpp {args.llama_cpp} "
        f"--ctx {args.ctx} --repeat {args.repeat}"
        + (f" --text-copies {args.text_copies}" if args.text_copies > 1 else ""),
        "binary": str(binary),
        "threads": args.threads,
        "ctx": args.ctx,
        "text_bytes": text.stat().st_size,
        "tokens_scored": results["candidates"][0]["metrics"]["counts"]["tokens"],
        "seconds": best,
        "all_seconds": times,
        "llama_cpp_total_s": llama_total,
        "lmkl_over_llama_cpp": best["lmkl"] / llama_total,
        "lmkl_scoring_s": results["throughput"]["seconds"],
        "kl_lmkl": {k: kl[k] for k in ("mean", "median", "p99", "max")},
        "kl_llama_cpp": llama_kld_stats(kld_output),
        "reference_parameters": results["reference"]["parameters"],
        "candidate_parameters": results["candidates"][0]["model"]["parameters"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_llama_cpp" + (f"-x{args.text_copies}" if args.text_copies > 1 else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / f"{stem}.md").write_text(md)
    print(md)


def markdown(r: dict[str, Any]) -> str:
    s = r["seconds"]
    lk, ll = r["kl_lmkl"], r["kl_llama_cpp"]
    rows = [
        f"Measured {r['date']} on {r['machine']}; `{r['command']}` ({r['threads']} threads).",
        "",
        f"Demo pair ({r['reference_parameters']:,} / {r['candidate_parameters']:,} parameters, "
        f"float32 GGUF for llama.cpp), {r['tokens_scored']:,} scored tokens of held-out text, "
        f"llama-cpp windowing at n_ctx {r['ctx']}; whole processes, fastest of the repeats:",
        "",
        "| tool | seconds |",
        "|---|---:|",
        f"| llama.cpp base pass (reference logits file) | {s['llama_base']:.2f} |",
        f"| llama.cpp KLD pass | {s['llama_kld']:.2f} |",
        f"| llama.cpp, both passes | {r['llama_cpp_total_s']:.2f} |",
        f"| lmkl compare (one process; {r['lmkl_scoring_s']:.2f} s of it scoring) | "
        f"{s['lmkl']:.2f} |",
        "",
        f"lmkl / llama.cpp: **{r['lmkl_over_llama_cpp']:.2f}** (target ≤ 1).",
        "",
        "| KL(P‖Q) | lmkl | llama.cpp |",
        "|---|---:|---:|",
    ]
    for key in ("mean", "median", "p99", "max"):
        theirs = f"{ll[key]:.6f}" if key in ll else "-"
        rows.append(f"| {key} | {lk[key]:.6f} | {theirs} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
