"""Benchmark lmkl against the forward passes it cannot avoid, as users time it (not a test).

Random-initialised Llama models of realistic shape, built locally (no downloads):

* ``v49k``: a SmolLM-135M-shaped reference (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536,
  vocabulary 49,152, tied embeddings; 134.5M parameters) and an 81M candidate (15 layers);
* ``v128k``: a 256-wide, 2-layer pair with a 128,256-token vocabulary (where the output layer
  and the KL dominate).

First, whole processes (the headline figures): ``lmkl compare ...`` as a user runs it, against
``scripts/bench_baseline.py forward`` (a script that reads the same documents, loads both models
and runs their full forwards: the floor for any exact method) and ``... naive`` (the same plus
``log_softmax`` and ``kl_div``), each a fresh process, at two job sizes. From them: each
command's fixed cost (the intercept: start-up, imports, loading, probes, hashing, compiling,
writing), lmkl's fixed cost over the forward-only script's, the marginal per-token ratio (the
slope ratio: the difference of the two sizes cancels fixed costs), the end-to-end ratio at the
larger size and each process's peak RSS; in wall and in CPU time.

Then the in-process breakdown, measured on the same batches (documents of 255 words, one window
each, batches of 8):

* forward-only: both models' full forward with full logits;
* naive: full logits, ``log_softmax``, ``kl_div`` (what a short script does);
* lmkl: ``run_comparison`` (scoring time; the fused kernel compiled beforehand, compile time
  reported separately);
* peak RSS above the decoder-only floor, each in its own process (v128k, 2048 tokens, batch 8);
* cache bytes per token, padding efficiency with and without ``--max-batch-tokens``, and the
  time to score N candidates with a reference cache vs in one live run.

Usage::

    python scripts/bench.py               # everything, ~25 min on 2 CPU cores
    python scripts/bench.py --whole-only  # the whole-process figures only, ~10 min
    python scripts/bench.py --quick       # fewer tokens, no 135M pair: a few minutes

Writes ``scripts/results/bench[-quick][-whole].json`` and ``.md``. Timings on a shared machine
are noisy: each timed step runs ``--repeat`` times (whole processes: 3, --quick 2) and the
fastest is kept, and the load average is recorded. ``scripts/bench_llama_cpp.py`` is the peer
benchmark against llama.cpp (it needs a llama.cpp build).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS: dict[str, dict[str, Any]] = {
    "v49k": {
        "vocab": 49152,
        "reference": {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "mlp": 1536},
        "candidate": {"hidden": 576, "layers": 15, "heads": 9, "kv_heads": 3, "mlp": 1536},
    },
    "v128k": {
        "vocab": 128256,
        "reference": {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 4, "mlp": 1024},
        "candidate": {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 4, "mlp": 768},
    },
}
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]


# ---------------------------------------------------------------------------------------------
# Assets: a word-level tokenizer of any size, random models, documents of known token counts
# ---------------------------------------------------------------------------------------------


def make_tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update({f"w{i}": i for i in range(len(SPECIALS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def make_model(path: Path, vocab: int, shape: dict[str, int], seed: int, tokenizer: Any) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # A larger output scale than the default init gives peaked, model-like distributions.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_data(path: Path, vocab: int, docs: int, words: int, seed: int, vary: bool = False) -> Path:
    import numpy as np

    rng = np.random.default_rng(seed)
    with path.open("w") as fh:
        for _ in range(docs):
            n = int(rng.integers(16, words + 1)) if vary else words
            ids = rng.integers(len(SPECIALS), vocab, size=n)
            fh.write(json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n")
    return path


def build_assets(work: Path, pairs: list[str], tokens: int) -> dict[str, Any]:
    assets: dict[str, Any] = {}
    for name in pairs:
        spec = PAIRS[name]
        tok = make_tokenizer(spec["vocab"])
        root = work / name
        root.mkdir(parents=True, exist_ok=True)
        assets[name] = {
            "reference": make_model(root / "reference", spec["vocab"], spec["reference"], 1, tok),
            "candidate": make_model(root / "candidate", spec["vocab"], spec["candidate"], 2, tok),
            # 255 words + BOS = one 256-token window per document
            "data": make_data(
                root / f"data-{tokens}.jsonl", spec["vocab"], tokens // 256, 255, seed=3
            ),
        }
    return assets


# ---------------------------------------------------------------------------------------------
# Timed steps
# ---------------------------------------------------------------------------------------------


def load_as_lmkl(path: Path) -> Any:
    import torch

    from lmkl.models import load_model
    from lmkl.specs import ModelSpec

    return load_model(ModelSpec(model=str(path)), torch.device("cpu"))


def batches(path: Path, data: Path, batch_size: int = 8) -> list[Any]:
    from transformers import AutoTokenizer

    from lmkl.data.corpus import load_corpus
    from lmkl.data.windows import make_windows
    from lmkl.scoring.batches import make_batches
    from lmkl.specs import DataSpec, WindowSpec

    tok = AutoTokenizer.from_pretrained(path)
    windows = make_windows(
        load_corpus(DataSpec(source=str(data))), tok, WindowSpec(context_length=256), True
    )
    return list(make_batches(windows, batch_size, 2))


def forward_only(models: list[Any], batch_list: list[Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of both models' full forwards with full logits."""
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in batch_list:
            for model in models:
                _ = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
    return time.perf_counter() - t0, time.process_time() - c0


def naive(models: list[Any], batch_list: list[Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of full logits, log_softmax and kl_div, batch as given."""
    import torch
    import torch.nn.functional as F

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in batch_list:
            lp, lq = (
                F.log_softmax(
                    m(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        use_cache=False,
                    ).logits.float(),
                    -1,
                )
                for m in models
            )
            kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
            float(kl[batch.attention_mask.bool()].mean())
    return time.perf_counter() - t0, time.process_time() - c0


def lmkl_run(
    reference: Path | str,
    candidates: list[Path],
    data: Path | None,
    out: Path,
    compile: bool = True,
    log: Any = None,
    **compute: Any,
) -> dict[str, Any]:
    from lmkl.engine.token_compare import run_comparison
    from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

    t0 = time.perf_counter()
    outcome = run_comparison(
        ModelSpec(model=str(reference), label="reference"),
        [ModelSpec(model=str(c), label=f"candidate-{i}") for i, c in enumerate(candidates)],
        DataSpec(source=str(data)) if data else None,
        WindowSpec(context_length=256) if data else None,
        ComputeSpec(batch_size=compute.pop("batch_size", 8), compile=compile, **compute),
        OutputSpec(dir=str(out), overwrite=True),
        log=log,
    )
    wall = time.perf_counter() - t0
    return outcome.results | {"wall_seconds": wall}


def prepare_kernel(vocab: int) -> float:
    """Prepare the fused kernel for this vocabulary (what a run's first chunk pays once): the
    native C kernel built and loaded on a CPU, else the torch.compile'd one."""
    import torch

    from lmkl.scoring.fused import MetricsKernel

    t0 = time.perf_counter()
    kernel = MetricsKernel(compile=True, device="cpu")
    a = torch.randn(4, vocab)
    kernel(a, a + 1, torch.zeros(4, dtype=torch.long))
    if kernel.backend == "eager":
        print("warning: no native or compiled kernel; lmkl runs eager", file=sys.stderr)
    return time.perf_counter() - t0


def breakdown(paths: dict[str, Path], vocab: int) -> dict[str, float]:
    """CPU seconds of each stage of lmkl's scoring on warm models, beside the full forwards."""
    import torch

    from lmkl.scoring.batches import model_rows
    from lmkl.scoring.token_scoring import WorstTracker, make_kernel
    from lmkl.specs import ComputeSpec

    ref, cand = load_as_lmkl(paths["reference"]), load_as_lmkl(paths["candidate"])
    batch_list = batches(paths["reference"], paths["data"])
    tokens = sum(b.targets.numel() for b in batch_list)
    kernel, chunk = make_kernel(ComputeSpec(), vocab, tokens, lambda _m: None)
    forward_only([ref.model, cand.model], batch_list)  # warm up
    out = dict.fromkeys(("decoders", "output_layers", "fused_kernel", "worst_tracking"), 0.0)
    out["forward_only"] = forward_only([ref.model, cand.model], batch_list)[1]

    @contextlib.contextmanager
    def timed(key: str) -> Any:
        c0 = time.process_time()
        yield
        out[key] += time.process_time() - c0

    with torch.inference_mode():
        for batch in batch_list:
            with timed("decoders"):
                rr, cr = model_rows(ref, batch), model_rows(cand, batch)
            tracker = WorstTracker(50)
            for s in range(0, batch.targets.numel(), chunk):
                with timed("output_layers"):
                    la, lb = ref.logits(rr[s : s + chunk]), cand.logits(cr[s : s + chunk])
                t = batch.targets[s : s + chunk]
                with timed("fused_kernel"):
                    m = kernel(la, lb, t, vocab_size=vocab)
                with timed("worst_tracking"):
                    tracker.offer(
                        m["kl"], la, lb, s, 1.0, lse=(m["lse_reference"], m["lse_candidate"])
                    )
    out["chunk_tokens"] = chunk
    out["tokens"] = tokens
    return out


def best(fn: Any, repeat: int) -> float:
    return min(fn() for _ in range(repeat))


# ---------------------------------------------------------------------------------------------
# Peak memory, each mode in a fresh process
# ---------------------------------------------------------------------------------------------


def _reset_peak() -> None:
    """Start peak-RSS accounting afresh (Linux >= 4.0): loading is not what is measured."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def memory_child(mode: str, pair: Path, data: Path, out: Path) -> None:
    """Run one mode and print its peak RSS (bytes) from after the models were loaded.

    ``floor`` runs the decoders only (no output layer). Every mode imports the same libraries
    and reads the data after the reset, so the differences are the scoring's own memory.
    """
    import datasets  # noqa: F401  (same imports in every mode, before the reset)
    import pyarrow.parquet  # noqa: F401
    import torch

    import lmkl.engine.token_compare  # noqa: F401

    ref, cand = pair / "reference", pair / "candidate"
    if mode == "lmkl" or mode == "lmkl-eager":
        # run_comparison logs "reading data" right after loading both models.
        def log(message: str) -> None:
            if message.startswith("reading data"):
                _reset_peak()

        if mode == "lmkl-eager":
            os.environ["LMKL_NATIVE_KERNEL"] = "0"  # the torch fallback path
        lmkl_run(ref, [cand], data, out / f"memory-{mode}", compile=mode == "lmkl", log=log)
    else:
        models = [load_as_lmkl(ref).model, load_as_lmkl(cand).model]
        _reset_peak()
        batch_list = batches(ref, data)
        if mode == "floor":
            with torch.inference_mode():
                for batch in batch_list:
                    for m in models:
                        _ = m.model(
                            input_ids=batch.input_ids,
                            attention_mask=batch.attention_mask,
                            use_cache=False,
                        ).last_hidden_state
        elif mode == "naive":
            naive(models, batch_list)
        elif mode == "forward":
            forward_only(models, batch_list)
    print(json.dumps({"mode": mode, "peak_rss": _peak_rss()}))


def measure_memory(mode: str, pair: Path, data: Path, work: Path) -> int:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            mode,
            "--pair",
            str(pair),
            "--data",
            str(data),
            "--workdir",
            str(work),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise RuntimeError(f"memory run '{mode}' failed: {result.stderr[-2000:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_rss"])


# ---------------------------------------------------------------------------------------------
# Whole processes: what a user times, from pressing enter to the printed table
# ---------------------------------------------------------------------------------------------

#: The command a user runs, as a process (the console script's own code).
LMKL_MAIN = "import sys; from lmkl.cli import main; sys.argv[0] = 'lmkl'; sys.exit(main())"
BASELINE = ROOT / "scripts" / "bench_baseline.py"


def _measured_child(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One child run through a tiny reaper process, so its peak RSS is its own."""
    reaper = (
        "import json, os, resource, subprocess, sys, time\n"
        "t0 = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t0\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "rss, cpu = u.ru_maxrss * 1024, u.ru_utime + u.ru_stime\n"
        "print(json.dumps({'rc': p.returncode, 'wall_s': wall, 'peak_rss': rss, 'cpu_s': cpu,"
        " 'stdout': p.stdout[-4000:], 'stderr': p.stderr[-2000:]}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", reaper, *argv], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if result.returncode:
        raise RuntimeError(f"reaper failed: {result.stderr[-2000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["rc"]:
        raise RuntimeError(f"{argv[:4]} failed ({report['rc']}): {report['stderr']}")
    return report


def process_commands(
    tool: str, paths: dict[str, Path], data: Path, batch: int, out: Path
) -> list[str]:
    if tool == "lmkl":
        return [
            sys.executable,
            "-c",
            LMKL_MAIN,
            "compare",
            str(paths["reference"]),
            str(paths["candidate"]),
            "--data",
            str(data),
            "--context-length",
            "256",
            "--batch-size",
            str(batch),
            "--out",
            str(out),
            "--overwrite",
            "--quiet",
        ]
    return [
        sys.executable,
        str(BASELINE),
        tool,
        str(paths["reference"]),
        str(paths["candidate"]),
        str(data),
        "--batch-size",
        str(batch),
        "--context-length",
        "256",
    ]


def whole_process(
    name: str, assets: dict[str, Any], work: Path, sizes: list[int], batch: int, repeat: int
) -> dict[str, Any]:
    """lmkl compare vs the forward-only and naive scripts, each a fresh process, at two sizes.

    Wall time t(N) = fixed + N x per-token: the difference of two sizes cancels the fixed cost
    (the marginal ratio), the intercepts give each command's fixed cost. Runs are interleaved
    (a burst of load hits all three alike); the fastest of ``repeat`` is kept. One untimed run of
    each first warms the page cache, lmkl's weight-hash memo and Inductor's cache, as on a
    user's second run (the first run's time is reported too).
    """
    paths = assets[name]
    vocab = PAIRS[name]["vocab"]
    env = {k: v for k, v in os.environ.items() if k != "LMKL_COMPILE_MIN_ELEMENTS"}
    env |= {
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "LMKL_CACHE_DIR": str(work / "lmkl-cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    tools = ("forward", "naive", "lmkl")
    datas = {
        n: make_data(paths["reference"].parent / f"data-{n}.jsonl", vocab, n // 256, 255, seed=3)
        for n in sizes
    }
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {t: {n: [] for n in sizes} for t in tools}
    first: dict[str, float] = {}
    for n in sizes:
        for rep in range(repeat + 1):
            for tool in tools:
                print(f"[{name}] whole process: {tool}, {n} tokens, run {rep}", file=sys.stderr)
                argv = process_commands(tool, paths, datas[n], batch, work / f"{name}-wp-{n}")
                result = _measured_child(argv, env)
                if rep == 0:
                    first.setdefault(tool, result["wall_s"])
                    continue
                runs[tool][n].append(result)
    small, large = sizes[0], sizes[-1]

    def fit(key: str) -> tuple[dict[str, dict[int, float]], dict[str, float], dict[str, float]]:
        fastest = {t: {n: min(r[key] for r in runs[t][n]) for n in sizes} for t in tools}
        slope = {t: (fastest[t][large] - fastest[t][small]) / (large - small) for t in tools}
        return fastest, slope, {t: fastest[t][small] - slope[t] * small for t in tools}

    best, slope, fixed = fit("wall_s")
    # Process CPU seconds (all threads): steadier than wall time when other jobs share the
    # cores, though they count a spinning thread as busy.
    cpu, cpu_slope, cpu_fixed = fit("cpu_s")
    rss = {t: max(r["peak_rss"] for r in runs[t][large]) for t in tools}
    lmkl_results = json.loads((work / f"{name}-wp-{large}" / "results.json").read_text())
    return {
        "vocab": vocab,
        "batch_size": batch,
        "sizes": sizes,
        "repeat": repeat,
        "wall_s": best,
        "all_wall_s": {t: {n: [r["wall_s"] for r in runs[t][n]] for n in sizes} for t in tools},
        "first_run_s": first,
        "fixed_s": fixed,
        "per_token_ms": {t: slope[t] * 1e3 for t in tools},
        "fixed_over_forward_s": fixed["lmkl"] - fixed["forward"],
        "marginal_ratio_vs_forward": slope["lmkl"] / slope["forward"],
        "marginal_ratio_naive_vs_forward": slope["naive"] / slope["forward"],
        "end_to_end_ratio_vs_forward": best["lmkl"][large] / best["forward"][large],
        "end_to_end_ratio_vs_naive": best["lmkl"][large] / best["naive"][large],
        "peak_rss": rss,
        "cpu_s": cpu,
        "cpu_fixed_s": cpu_fixed,
        "cpu_fixed_over_forward_s": cpu_fixed["lmkl"] - cpu_fixed["forward"],
        "cpu_marginal_ratio_vs_forward": cpu_slope["lmkl"] / cpu_slope["forward"],
        "cpu_end_to_end_ratio_vs_forward": cpu["lmkl"][large] / cpu["forward"][large],
        "lmkl_kernel": lmkl_results["compute"]["kernel"],
        "lmkl_scoring_s": lmkl_results["throughput"]["seconds"],
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def bench_pair(name: str, assets: dict[str, Any], work: Path, repeat: int) -> dict[str, Any]:
    paths = assets[name]
    vocab = PAIRS[name]["vocab"]
    print(f"[{name}] preparing the fused kernel", file=sys.stderr)
    prepare_s = prepare_kernel(vocab)
    # The baselines use the models exactly as lmkl loads them (same dtype and attention).
    models = [load_as_lmkl(paths["reference"]).model, load_as_lmkl(paths["candidate"]).model]
    batch_list = batches(paths["reference"], paths["data"])
    tokens_in = sum(b.attention_mask.numel() for b in batch_list)
    print(f"[{name}] forward-only / naive / lmkl on {tokens_in} tokens", file=sys.stderr)
    # Warm-ups, untimed, for both sides (first-touch page faults, allocator growth, one-off
    # kernel selection).
    forward_only(models, batch_list)
    lmkl_run(paths["reference"], [paths["candidate"]], paths["data"], work / f"{name}-run")
    fwd, nai, runs = [], [], []
    for _ in range(repeat):  # interleaved: a burst of load from other jobs hits all three alike
        fwd.append(forward_only(models, batch_list))
        nai.append(naive(models, batch_list))
        runs.append(
            lmkl_run(paths["reference"], [paths["candidate"]], paths["data"], work / f"{name}-run")
        )
    del models
    print(f"[{name}] stage breakdown", file=sys.stderr)
    stages = breakdown(paths, vocab)
    lmkl_walls = [r["throughput"]["seconds"] for r in runs]
    lmkl_cpus = [r["throughput"]["cpu_seconds"] for r in runs]
    per_repeat = {
        "vs_forward": [lw / fw for lw, (fw, _) in zip(lmkl_walls, fwd, strict=True)],
        "vs_naive": [lw / nw for lw, (nw, _) in zip(lmkl_walls, nai, strict=True)],
        "cpu_vs_forward": [lc / fc for lc, (_, fc) in zip(lmkl_cpus, fwd, strict=True)],
        "cpu_vs_naive": [lc / nc for lc, (_, nc) in zip(lmkl_cpus, nai, strict=True)],
    }
    run = min(runs, key=lambda r: r["throughput"]["seconds"])
    lmkl_s = run["throughput"]["seconds"]
    lmkl_cpu = min(r["throughput"]["cpu_seconds"] for r in runs)
    fwd_s, fwd_cpu = min(w for w, _ in fwd), min(c for _, c in fwd)
    nai_s, nai_cpu = min(w for w, _ in nai), min(c for _, c in nai)
    params = {k: run[k]["parameters"] for k in ("reference",)} | {
        "candidate": run["candidates"][0]["model"]["parameters"]
    }
    return {
        "vocab": vocab,
        "parameters": params,
        "tokens_in": tokens_in,
        "tokens_scored": run["candidates"][0]["metrics"]["counts"]["tokens"],
        "forward_only_s": fwd_s,
        "naive_s": nai_s,
        "lmkl_s": lmkl_s,
        "forward_only_cpu_s": fwd_cpu,
        "naive_cpu_s": nai_cpu,
        "lmkl_cpu_s": lmkl_cpu,
        "all_wall_s": {
            "forward_only": [w for w, _ in fwd],
            "naive": [w for w, _ in nai],
            "lmkl": [r["throughput"]["seconds"] for r in runs],
        },
        "lmkl_end_to_end_s": run["wall_seconds"],
        "kernel_prepare_s": prepare_s,
        "kernel": run["compute"]["kernel"],
        "chunk_tokens": run["compute"]["chunk_tokens"],
        # Each repeat's lmkl run is compared with the baselines timed just before it; the
        # median over repeats is the headline figure (robust to bursts of load).
        "per_repeat_ratios": per_repeat,
        "ratio_vs_forward": statistics.median(per_repeat["vs_forward"]),
        "ratio_vs_naive": statistics.median(per_repeat["vs_naive"]),
        "cpu_ratio_vs_forward": statistics.median(per_repeat["cpu_vs_forward"]),
        "cpu_ratio_vs_naive": statistics.median(per_repeat["cpu_vs_naive"]),
        "ratio_of_fastest_vs_forward": lmkl_s / fwd_s,
        "ratio_of_fastest_vs_naive": lmkl_s / nai_s,
        "warm_stage_ratio_vs_forward": (
            stages["decoders"]
            + stages["output_layers"]
            + stages["fused_kernel"]
            + stages["worst_tracking"]
        )
        / stages["forward_only"],
        "ratio_vs_forward_incl_kernel_prepare": (lmkl_s + prepare_s) / fwd_s,
        "naive_vs_forward": nai_s / fwd_s,
        "tokens_per_s": run["throughput"]["tokens_per_s"],
        "stages_cpu_s": stages,
        "kl_mean": run["candidates"][0]["metrics"]["kl"]["mean"],
    }


def bench_cache(
    name: str, assets: dict[str, Any], work: Path, n: int, tokens: int
) -> dict[str, Any]:
    """N candidates: one live run with N candidates vs a cache then N runs against it."""
    from lmkl.engine.cache_build import build_cache
    from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, WindowSpec

    paths = dict(assets[name])
    paths["data"] = make_data(
        paths["reference"].parent / f"data-cache-{tokens}.jsonl",
        PAIRS[name]["vocab"],
        max(tokens // 256, 1),
        255,
        seed=4,
    )
    cands = [paths["candidate"]] * n
    print(f"[{name}] {n} candidates: live, then cache + {n} cached runs", file=sys.stderr)
    live = lmkl_run(paths["reference"], cands, paths["data"], work / f"{name}-live-n")
    single = lmkl_run(
        paths["reference"], [paths["candidate"]], paths["data"], work / f"{name}-live-1"
    )
    t0 = time.perf_counter()
    manifest = build_cache(
        ModelSpec(model=str(paths["reference"])),
        DataSpec(source=str(paths["data"])),
        WindowSpec(context_length=256),
        ComputeSpec(batch_size=8),
        work / f"{name}-cache",
        overwrite=True,
    )
    cache_build = time.perf_counter() - t0
    cached_scoring = []
    for i in range(n):
        result = lmkl_run(
            work / f"{name}-cache", [paths["candidate"]], None, work / f"{name}-cached-{i}"
        )
        cached_scoring.append(result["throughput"]["seconds"])
    t_topk = time.perf_counter()
    topk = build_cache(
        ModelSpec(model=str(paths["reference"])),
        DataSpec(source=str(paths["data"])),
        WindowSpec(context_length=256),
        ComputeSpec(batch_size=8),
        work / f"{name}-cache-top32",
        overwrite=True,
        top_k=32,
    )
    topk_build = time.perf_counter() - t_topk
    topk_run = lmkl_run(
        work / f"{name}-cache-top32", [paths["candidate"]], None, work / f"{name}-topk-run"
    )
    bounds = topk_run["candidates"][0]["metrics"]["kl_bounds"]
    return {
        "pair": name,
        "tokens": tokens,
        "n_candidates": n,
        "live_one_run_s": live["throughput"]["seconds"],
        "live_single_pair_s": single["throughput"]["seconds"],
        "separate_live_runs_s": n * single["throughput"]["seconds"],
        "cache_build_s": manifest["seconds"],
        "cache_build_wall_s": cache_build,
        "cached_runs_s": cached_scoring,
        "cache_total_s": manifest["seconds"] + sum(cached_scoring),
        "cache_bytes_per_token": manifest["bytes"]["row_per_token"],
        "cache_bytes_per_token_on_disk": manifest["bytes"]["per_token"],
        "cache_hidden_size": manifest["rows"]["shape"][1],
        "cache_dtype": manifest["rows"]["dtype"],
        "llama_cpp_bytes_per_token": 2 * PAIRS[name]["vocab"],
        "topk32_build_s": manifest_seconds(topk, topk_build),
        "topk32_bytes_per_token": topk["bytes"]["row_per_token"],
        "topk32_run_s": topk_run["throughput"]["seconds"],
        "topk32_kl_mean_bounds": [bounds["lower"]["mean"], bounds["upper"]["mean"]],
        "exact_kl_mean": single["candidates"][0]["metrics"]["kl"]["mean"],
    }


def manifest_seconds(manifest: dict[str, Any], fallback: float) -> float:
    return float(manifest.get("seconds", fallback))


def padding(assets: dict[str, Any], work: Path) -> dict[str, Any]:
    """Padding efficiency of consecutive batches vs length-sorted token-budget batches."""
    from transformers import AutoTokenizer

    from lmkl.data.corpus import load_corpus
    from lmkl.data.windows import make_windows
    from lmkl.scoring.batches import make_batches
    from lmkl.specs import DataSpec, WindowSpec

    name = next(iter(assets))
    tok = AutoTokenizer.from_pretrained(assets[name]["reference"])
    data = make_data(work / "varied.jsonl", PAIRS[name]["vocab"], 256, 1000, seed=7, vary=True)
    windows = make_windows(
        load_corpus(DataSpec(source=str(data))), tok, WindowSpec(context_length=512), True
    )

    def efficiency(**kw: Any) -> float:
        real = slots = 0
        for b in make_batches(windows, 8, 2, **kw):
            real += int(b.attention_mask.sum())
            slots += b.attention_mask.numel()
        return real / slots

    return {
        "documents": 256,
        "lengths": "16..1000 words, context 512",
        "batch_size_8": efficiency(),
        "max_batch_tokens_4096": efficiency(max_batch_tokens=4096),
    }


def memory(assets: dict[str, Any], work: Path) -> dict[str, Any]:
    pair = assets["v128k"]["reference"].parent
    # Always the setting: 2048 tokens in one batch of 8 windows.
    data = make_data(pair / "data-memory.jsonl", PAIRS["v128k"]["vocab"], 8, 255, seed=3)
    out: dict[str, Any] = {}
    for mode in ("floor", "forward", "naive", "lmkl", "lmkl-eager"):
        print(f"[memory] {mode}", file=sys.stderr)
        out[mode] = measure_memory(mode, pair, data, work)
    extra = {m: out[m] - out["floor"] for m in out if m != "floor"}
    return {
        "peak_rss": out,
        "extra_over_floor": extra,
        "lmkl_extra_vs_naive_extra": extra["lmkl"] / extra["naive"],
        "lmkl_eager_extra_vs_naive_extra": extra["lmkl-eager"] / extra["naive"],
    }


LABELS = {"v49k": "135M/81M Llama, V=49,152", "v128k": "256-wide 2-layer pair, V=128,256"}


def whole_process_markdown(whole: dict[str, Any]) -> list[str]:
    """The headline table: whole processes, fixed cost, marginal and end-to-end ratios."""
    gib = 2**30
    lines = [
        "Whole processes (`lmkl compare ...` vs a script that loads both models and runs their "
        "full forwards, and the naive log_softmax + kl_div script; fastest of the repeats):",
        "",
        "| case | tokens | forward-only s | naive s | lmkl s | lmkl fixed cost over "
        "forward-only (target ≤ 1.5 s) | marginal lmkl / forward (target) | end to end "
        "lmkl / forward (target) | peak RSS forward / naive / lmkl GiB |",
        "|---|---|---|---|---|---:|---:|---:|---|",
    ]
    marginal_target = {"v49k": "≤ 1.05", "v128k": "≤ 1.15"}
    for name, w in whole.items():
        sizes = w["sizes"]
        cell = {
            t: " / ".join(f"{w['wall_s'][t][n]:.2f}" for n in sizes)
            for t in ("forward", "naive", "lmkl")
        }
        e2e_target = "≤ 1.15" if name == "v49k" and sizes[-1] == 6144 else "-"
        lines.append(
            f"| {LABELS[name]}, batch {w['batch_size']} | {' / '.join(map(str, sizes))} | "
            f"{cell['forward']} | {cell['naive']} | {cell['lmkl']} | "
            f"**{w['fixed_over_forward_s']:+.2f} s** | "
            f"**{w['marginal_ratio_vs_forward']:.2f}** ({marginal_target[name]}) | "
            f"**{w['end_to_end_ratio_vs_forward']:.2f}** at {sizes[-1]} ({e2e_target}) | "
            f"{w['peak_rss']['forward'] / gib:.2f} / {w['peak_rss']['naive'] / gib:.2f} / "
            f"{w['peak_rss']['lmkl'] / gib:.2f} |"
        )
    lines.append("")
    for name, w in whole.items():
        lines.append(
            f"- {name}: fixed cost (intercept) forward-only {w['fixed_s']['forward']:.2f} s, "
            f"naive {w['fixed_s']['naive']:.2f} s, lmkl {w['fixed_s']['lmkl']:.2f} s; per token "
            f"{w['per_token_ms']['forward']:.3f} / {w['per_token_ms']['naive']:.3f} / "
            f"{w['per_token_ms']['lmkl']:.3f} ms (naive / forward "
            f"{w['marginal_ratio_naive_vs_forward']:.2f}); "
            f"in process CPU time: fixed cost over forward-only "
            f"{w['cpu_fixed_over_forward_s']:+.2f} s, marginal ratio "
            f"{w['cpu_marginal_ratio_vs_forward']:.2f}, end to end "
            f"{w['cpu_end_to_end_ratio_vs_forward']:.2f}; "
            f"lmkl's kernel: {w['lmkl_kernel']}; first (cold) runs: "
            + ", ".join(f"{t} {v:.1f} s" for t, v in w["first_run_s"].items())
            + "."
        )
    lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    def f(x: float, d: int = 2) -> str:
        return f"{x:.{d}f}"

    lines = [
        f"Measured {report['date']} on {report['machine']} "
        f"(load average {report['load_average_start']} at start, "
        f"{report['load_average_end']} at the end); `{report['command']}`.",
        "",
        *whole_process_markdown(report["whole_process"]),
    ]
    if "pairs" not in report:
        return "\n".join(lines) + "\n"
    lines += [
        "In-process breakdown (scoring loop only: model loading excluded, kernel prepared "
        "beforehand):",
        "",
        "| case | tokens | forward-only s | naive s | lmkl s | lmkl / forward (target) | "
        "lmkl / naive (target) | same, CPU time | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets = {"v49k": ("≤ 1.10", "≤ 1.0"), "v128k": ("≤ 1.20", "≤ 0.4")}
    for name, r in report["pairs"].items():
        label = "135M/81M Llama, V=49,152" if name == "v49k" else "256-wide 2-layer pair, V=128,256"
        tf, tn = targets[name]
        lines.append(
            f"| {label} | {r['tokens_in']} | {f(r['forward_only_s'])} | {f(r['naive_s'])} | "
            f"{f(r['lmkl_s'])} | **{f(r['ratio_vs_forward'])}** ({tf}) | "
            f"**{f(r['ratio_vs_naive'])}** ({tn}) | {f(r['cpu_ratio_vs_forward'])} / "
            f"{f(r['cpu_ratio_vs_naive'])} | {r['tokens_per_s']:,.0f} |"
        )
    lines.append("")
    lines.append(
        "Seconds are the fastest of the repeats (wall clock); the ratios are medians over the "
        "repeats of each lmkl run against the baselines timed just before it (wall clock, and "
        "process CPU time in the 'same, CPU time' column). "
        "The CPU-time ratios "
        "(process CPU seconds, all threads) are steadier when other jobs share the "
        "cores. "
    )
    lines.append(
        "lmkl time is scoring time (model loading excluded, like the baselines); the "
        "fused kernel is prepared once per process beforehand (native: built once per machine, "
        "then loaded and self-checked): "
        + ", ".join(f"{n}: {f(r['kernel_prepare_s'], 1)} s" for n, r in report["pairs"].items())
        + "."
    )
    lines += [
        "",
        "Where lmkl's time goes (CPU seconds on warm models, all batches):",
        "",
        "| case | forward-only | decoders | output layers | fused KL kernel "
        "| worst positions | sum / forward-only |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["pairs"].items():
        st = r["stages_cpu_s"]
        lines.append(
            f"| {name} | {f(st['forward_only'])} | {f(st['decoders'])} | "
            f"{f(st['output_layers'])} | {f(st['fused_kernel'])} | {f(st['worst_tracking'])} | "
            f"{f(r['warm_stage_ratio_vs_forward'])} |"
        )
    if "memory" in report:
        m = report["memory"]
        gib = 2**30
        lines += [
            "",
            "| peak RSS, V=128,256, 2048 tokens, batch 8 | GiB | extra over decoder floor |",
            "|---|---:|---:|",
        ]
        for mode, label in (
            ("floor", "decoders only (floor)"),
            ("forward", "forward-only"),
            ("naive", "naive script"),
            ("lmkl", "lmkl (native kernel)"),
            ("lmkl-eager", "lmkl, torch eager kernel (LMKL_NATIVE_KERNEL=0, --no-compile)"),
        ):
            extra = m["extra_over_floor"].get(mode, 0)
            lines.append(f"| {label} | {f(m['peak_rss'][mode] / gib)} | {f(extra / gib)} GiB |")
        lines.append("")
        lines.append(
            f"lmkl extra / naive extra: **{f(m['lmkl_extra_vs_naive_extra'])}** "
            f"(torch eager kernel: {f(m['lmkl_eager_extra_vs_naive_extra'])}; target ≤ 0.20)"
        )
    if "cache" in report:
        c = report["cache"]
        lines += [
            "",
            f"Reference cache ({c['n_candidates']} candidates, pair {c['pair']}, "
            f"{c['tokens']} tokens): exact "
            f"cache {c['cache_bytes_per_token']:,} bytes/token (hidden {c['cache_hidden_size']} "
            f"x {c['cache_dtype']}; {c['cache_bytes_per_token_on_disk']:,.0f} bytes/token on "
            f"disk with the output layer and token data) vs "
            f"{c['llama_cpp_bytes_per_token']:,} for llama.cpp's logits file; top-32 cache "
            f"{c['topk32_bytes_per_token']} bytes/token.",
            "",
            "| N candidates | seconds |",
            "|---|---:|",
            f"| one live run with all N | {f(c['live_one_run_s'])} |",
            f"| N separate live runs (N x one pair) | {f(c['separate_live_runs_s'])} |",
            f"| exact cache: build + N cached runs | {f(c['cache_total_s'])} "
            f"({f(c['cache_build_s'])} + {' + '.join(f(x) for x in c['cached_runs_s'])}) |",
            f"| top-32 cache: build, then one cached run | {f(c['topk32_build_s'])}, "
            f"{f(c['topk32_run_s'])} |",
            "",
            f"Top-32 KL interval of the mean: [{f(c['topk32_kl_mean_bounds'][0], 4)}, "
            f"{f(c['topk32_kl_mean_bounds'][1], 4)}] around the exact "
            f"{f(c['exact_kl_mean'], 4)}.",
        ]
    p = report.get("padding")
    lines += (
        []
        if p is None
        else [
            "",
            f"Padding efficiency ({p['documents']} documents of {p['lengths']}): "
            f"batches of 8 consecutive windows {f(p['batch_size_8'], 3)}; "
            f"`--max-batch-tokens 4096` {f(p['max_batch_tokens_4096'], 3)}.",
        ]
    )
    return "\n".join(lines) + "\n"


#: Whole-process job sizes (tokens) and batch size per pair: (sizes, batch), by --quick.
WHOLE_PROCESS = {
    # The same kernel (native on a CPU) runs at both sizes, so their difference is the marginal
    # cost.
    False: {"v49k": ([2048, 6144], 4), "v128k": ([1024, 4096], 8)},
    True: {"v128k": ([512, 2048], 8)},
}


class _Done(Exception):
    """--whole-only: the rest of the bench is skipped."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens, V=128k pair only")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per run (x256)")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results")
    parser.add_argument(
        "--whole-only",
        action="store_true",
        help="only the whole-process comparison (no in-process breakdown, memory, cache)",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pair", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lmkl.models import quiet_hf_logging

    quiet_hf_logging()
    if args.memory_child:
        memory_child(args.memory_child, args.pair, args.data, args.workdir)
        return

    tokens = args.tokens or (512 if args.quick else 2048)
    repeat = args.repeat or (2 if args.quick else 3)
    pairs = ["v128k"] if args.quick else ["v49k", "v128k"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lmkl-bench-"))
    # The bench measures the compiled kernel at every size (the default threshold would
    # leave the --quick runs eager).
    # (Whole-process runs drop this variable: there lmkl decides as it does for users.)
    os.environ["LMKL_COMPILE_MIN_ELEMENTS"] = "0"
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "load_average_start": round(os.getloadavg()[0], 2),
        "command": "python scripts/bench.py"
        + (" --quick" if args.quick else "")
        + (" --whole-only" if args.whole_only else ""),
        "tokens": tokens,
        "repeat": repeat,
    }
    import torch

    report["torch"] = torch.__version__
    report["threads"] = torch.get_num_threads()
    try:
        assets = build_assets(work, pairs, tokens)
        # First, whole processes as a user times them (lmkl decides about compiling itself).
        report["whole_process"] = {
            name: whole_process(
                name, assets, work, *WHOLE_PROCESS[args.quick][name], repeat=2 if args.quick else 3
            )
            for name in pairs
        }
        if args.whole_only:
            raise _Done
        report["pairs"] = {name: bench_pair(name, assets, work, repeat) for name in pairs}
        report["padding"] = padding(assets, work)
        if "v128k" in assets:
            report["memory"] = memory(assets, work)
        report["cache"] = bench_cache(
            pairs[0], assets, work, args.candidates, tokens if args.quick else tokens // 2
        )
    except _Done:
        pass
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    report["bench_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if args.quick else "") + ("-whole" if args.whole_only else "")
    (args.out / f"bench{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"bench{suffix}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
