"""Benchmark: what KLCallback's evaluation costs, against a plain forward of the student.

Target (issue 20): one evaluation of the callback (:func:`lmkl.score_against` on the student in
memory, the teacher's side read from its exact reference cache) costs at most 1.1x a plain
forward of the student over the same held-out windows (``model(input_ids).logits`` under
``no_grad``, same batches), both timed as whole evaluations; and its peak extra memory is the
cache's rows of one batch plus one chunk of logits, never the teacher or ``[batch, seq, vocab]``
float32 logits of two models.

Two students are timed against the demo teacher's cache: the demo student (2 layers x 128, a
2048-token vocabulary: its output layer is a third of its compute, the hardest case for the
ratio) and a wider one (6 layers x 384, same tokenizer; the body dominates, as in real LMs).
The plain forward and the evaluations (without and with ``out``) are interleaved, ``--repeats``
rounds, the order reversed every other round so that a slow spell of a shared machine hits
each alike. Reported per student: min, median (p50) and max of each, the spread
(max/min - 1), and the ratios of the minima (the least disturbed runs: what the code costs)
and of the medians. The fixed cost of one evaluation, whatever the data's size, is measured on
a one-window cache as the evaluation's time minus the plain forward's there (minima). Peak
memory is measured in fresh subprocesses as the growth of the peak resident set during one
evaluation.

    python scripts/bench_callback.py                # writes scripts/results/bench_callback.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STUDENTS = {
    "demo-student": None,  # the demo candidate as built
    "wide-student": {"hidden_size": 384, "num_layers": 6, "num_heads": 6},
}


def student_model(name: str, directory: Path) -> Path:
    """The student's directory (the wide one is built, untrained: only its speed matters)."""
    from transformers import AutoTokenizer

    from lmkl.demo.assets import build_model, save_model
    from lmkl.demo.names import resolve_demo_value

    demo = Path(resolve_demo_value("demo:candidate"))
    shape = STUDENTS[name]
    if shape is None:
        return demo
    out = directory / name
    if not (out / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(demo)
        save_model(build_model("llama", len(tokenizer), **shape), tokenizer, out)
    return out


def teacher_cache(directory: Path, max_tokens: int, name: str = "cache") -> Path:
    import lmkl
    from lmkl.demo.names import resolve_demo_value

    cache = directory / name
    if not cache.exists():
        lmkl.build_reference_cache(
            resolve_demo_value("demo:reference"),
            resolve_demo_value("demo:heldout"),
            cache,
            context_length=256,
            batch_size=8,
            max_tokens=max_tokens,
        )
    return cache


def setup(student: Path, cache: Path) -> tuple[Any, Any, list[Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmkl.engine.in_memory import in_memory_model
    from lmkl.refcache.format import open_cache
    from lmkl.scoring.batches import make_batch, window_groups

    model = AutoModelForCausalLM.from_pretrained(student)
    loaded = in_memory_model(model, AutoTokenizer.from_pretrained(student), label="student")
    batches = [make_batch(g, 2) for g in window_groups(open_cache(cache).windows(), 8, None)]
    return model, loaded, batches


def plain_forward(model: Any, batches: list[Any]) -> None:
    """The baseline: the student's own full forward over the held-out batches."""
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            del logits


def evaluation(loaded: Any, cache: Path, out: Path | None = None) -> dict[str, Any]:
    import lmkl

    return lmkl.score_against(cache, loaded, out=out, overwrite=True, batch_size=8)


def memory_probe(mode: str, student: str, cache: str) -> None:
    """(subprocess) Growth of the resident set above its level before one evaluation, in MiB,
    sampled every millisecond by a thread (printed as JSON)."""
    import threading

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    model, loaded, batches = setup(Path(student), Path(cache))
    # Warm-up: one-time imports, the cache's first open, the allocator's first pages.
    evaluation(loaded, Path(cache)) if mode == "score" else plain_forward(model, batches)
    before = rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    evaluation(loaded, Path(cache)) if mode == "score" else plain_forward(model, batches)
    done.set()
    thread.join()
    print(json.dumps({"peak_growth_mib": (peak[0] - before) / 2**20}))


def summary(values: list[float]) -> dict[str, float]:
    """min, p50 and max of repeated timings, and their spread (max/min - 1)."""
    low, high = min(values), max(values)
    return {
        "min": low,
        "p50": statistics.median(values),
        "max": high,
        "spread": high / low - 1,
    }


def interleaved(
    model: Any, loaded: Any, batches: list[Any], cache: Path, out: Path, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each kind of evaluation, ``repeats`` interleaved rounds (order reversed every
    other round), after one warm-up of each."""
    runs = {
        "plain_forward": lambda: plain_forward(model, batches),
        "callback": lambda: evaluation(loaded, cache),
        "callback_with_out": lambda: evaluation(loaded, cache, out),
    }
    for run in runs.values():  # warm-up (imports, the cache's first open, allocator pages)
        run()
    times: dict[str, list[float]] = {key: [] for key in runs}
    for round_index in range(repeats):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for key in order:
            t0 = time.perf_counter()
            runs[key]()
            times[key].append(time.perf_counter() - t0)
    return times


def measure(name: str, work: Path, cache: Path, small: Path, repeats: int) -> dict[str, Any]:
    student = student_model(name, work)
    model, loaded, batches = setup(student, cache)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    times = interleaved(model, loaded, batches, cache, work / "run", repeats)
    stats = {key: summary(values) for key, values in times.items()}
    # The fixed cost per evaluation: on a one-window cache the forward is almost nothing.
    _, _, one = setup(student, small)
    small_times = interleaved(model, loaded, one, small, work / "run-small", repeats)
    small_stats = {key: summary(values) for key, values in small_times.items()}
    memory = {}
    for mode in ("plain", "score"):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory", mode, str(student), str(cache)],
            capture_output=True,
            text=True,
            check=True,
        )
        memory[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth_mib"]
    config = model.config
    plain = stats["plain_forward"]
    return {
        "student": name,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "windows": sum(len(b.windows) for b in batches),
        "tokens_in_windows": tokens,
        "repeats": repeats,
        "seconds": stats,
        "all_seconds": times,
        "ratio_callback": {
            "of_min": stats["callback"]["min"] / plain["min"],
            "of_p50": stats["callback"]["p50"] / plain["p50"],
        },
        "ratio_callback_with_out": {
            "of_min": stats["callback_with_out"]["min"] / plain["min"],
            "of_p50": stats["callback_with_out"]["p50"] / plain["p50"],
        },
        "one_window": {
            "tokens_in_windows": sum(int(b.attention_mask.sum()) for b in one),
            "seconds": small_stats,
            "all_seconds": small_times,
            "fixed_cost_s": small_stats["callback"]["min"] - small_stats["plain_forward"]["min"],
            "fixed_cost_with_out_s": small_stats["callback_with_out"]["min"]
            - small_stats["plain_forward"]["min"],
        },
        "peak_growth_mib": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", nargs=3, metavar=("MODE", "STUDENT", "CACHE"))
    parser.add_argument(
        "--results", type=Path, default=ROOT / "scripts" / "results" / "bench_callback.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        memory_probe(*args.memory)
        return
    with tempfile.TemporaryDirectory(prefix="lmkl-bench-callback-") as tmp:
        work = Path(tmp)
        cache = teacher_cache(work, args.max_tokens)
        small = teacher_cache(work, 200, "one-window-cache")  # one window of 256 tokens
        rows = [measure(name, work, cache, small, args.repeats) for name in STUDENTS]
    result = {
        "target": "callback evaluation <= 1.1x a plain student forward over the same windows",
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "device": "cpu",
        },
        "max_tokens": args.max_tokens,
        "rows": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        s, fixed = row["seconds"], row["one_window"]["fixed_cost_s"]
        print(
            f"{row['student']:<13} plain {s['plain_forward']['min']:.3f} s "
            f"(p50 {s['plain_forward']['p50']:.3f})  callback {s['callback']['min']:.3f} s "
            f"(p50 {s['callback']['p50']:.3f}): {row['ratio_callback']['of_min']:.2f}x of "
            f"minima, {row['ratio_callback']['of_p50']:.2f}x of p50; with out "
            f"{row['ratio_callback_with_out']['of_min']:.2f}x; fixed cost {fixed:.3f} s; "
            f"peak growth MiB plain {row['peak_growth_mib']['plain']:.0f} / "
            f"callback {row['peak_growth_mib']['score']:.0f}"
        )


if __name__ == "__main__":
    main()
