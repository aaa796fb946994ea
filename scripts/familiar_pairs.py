"""Measure the familiar pairs that reports and README use to say how large a KL is.

Runs, as a user would (each a whole ``lmkl`` process, offline, on the demo models):

- ``lmkl compare demo:reference demo:reference --candidate-dtype float16``: float32 weights
  rounded to float16;
- ``lmkl run configs/quantization.yaml``: the reference's noise floor and int8, float8, int4
  and int2 weight quantizations;
- ``lmkl compare demo:reference --quantize bitsandbytes:int8``: LLM.int8(), whose logits
  depend on the batch (its measured ``batch_dependence`` is kept beside its KL);
- ``lmkl demo``: a smaller, shorter-trained student against its reference (its token interval
  and document-bootstrap CI are kept too: README, "Reading the numbers");

all on the demo's held-out text at context 256, stride 128, and writes what each measured
(mean KL, share of tokens whose top-1 changes, PPL ratio) to ``lmkl/report/familiar_pairs.json``,
which the report reads, and the README's table to ``scripts/results/familiar_pairs.md``
(``tests/test_report_layout.py`` checks that the README shows these values).

Usage: ``python scripts/familiar_pairs.py [--work DIR]`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_JSON = ROOT / "lmkl" / "report" / "familiar_pairs.json"
OUT_MD = ROOT / "scripts" / "results" / "familiar_pairs.md"
WINDOWS = ["--context-length", "256", "--stride", "128"]


def lmkl(*args: str) -> None:
    command = [sys.executable, "-m", "lmkl", *args]
    print("$ lmkl", " ".join(args), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def measured(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        "kl": metrics["kl"]["mean"],
        "top1_changed": 1.0 - metrics["top1_agreement"]["mean"],
        "ppl_ratio": metrics["ppl"]["ratio"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="keep the run directories here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmkl-familiar-"))
    work.mkdir(parents=True, exist_ok=True)

    half, study, demo, bnb = work / "float16", work / "study", work / "demo", work / "bnb"
    lmkl("demo", "--out", str(demo), "--overwrite", "--quiet")
    lmkl("compare", "demo:reference", "demo:reference", "--candidate-dtype", "float16",
         "--reference-dtype", "float32", "--data", "demo:heldout", *WINDOWS,
         "--label", "float16", "--out", str(half), "--overwrite", "--quiet")  # fmt: skip
    lmkl("compare", "demo:reference", "--quantize", "bitsandbytes:int8", "--data", "demo:heldout",
         *WINDOWS, "--out", str(bnb), "--overwrite", "--quiet")  # fmt: skip
    try:
        lmkl("run", str(ROOT / "configs" / "quantization.yaml"), "--out", str(study),
             "--overwrite", "--quiet")  # fmt: skip
    except subprocess.CalledProcessError as exc:
        if exc.returncode != 3:  # 3: a gate failed (int2 does, by design); results are written
            raise

    def candidates(run: Path) -> dict[str, dict[str, Any]]:
        results = json.loads((run / "results.json").read_text())
        return {c["label"]: c["metrics"] for c in results["candidates"]}

    q = candidates(study)
    noise = json.loads((study / "results.json").read_text())["noise_floor"]["metrics"]
    int4 = [measured(q[label]) for label in ("int4-g16-torchao", "int4-g32-torchao", "int4-quanto")]
    pairs = [
        ("float16 rounding", "float32 weights rounded to float16 (demo reference)",
         [measured(candidates(half)["float16"])]),
        ("noise floor", "noise floor: 1e-3 relative weight noise (demo reference)",
         [measured(noise)]),
        ("int8", "int8 weights, torchao (demo reference)", [measured(q["int8-torchao"])]),
        ("float8", "float8 weights, torchao (demo reference)", [measured(q["float8-torchao"])]),
        ("int8 LLM.int8()", "int8 LLM.int8(), bitsandbytes on CPU (demo reference)",
         [measured(next(iter(candidates(bnb).values())))]),
        ("int4", "int4 weights, groups of 16 or 32, torchao / quanto (demo reference)", int4),
        ("int2", "int2 weights, quanto (demo reference)", [measured(q["int2-quanto"])]),
        ("demo student", "a 2-layer student vs its 4-layer reference (the demo)",
         [measured(next(iter(candidates(demo).values())))]),
    ]  # fmt: skip
    entries = []
    for name, pair, values in pairs:
        entry: dict[str, Any] = {"name": name, "pair": pair}
        for key in ("kl", "top1_changed", "ppl_ratio"):
            column = [v[key] for v in values]
            entry[key] = statistics.median(column)
            if len(column) > 1:
                entry[f"{key}_range"] = [min(column), max(column)]
        entries.append(entry)
    entries.sort(key=lambda e: e["kl"])

    from lmkl.formatting import Z95
    from lmkl.report.render import familiar_pairs_markdown

    bnb_model = json.loads((bnb / "results.json").read_text())["candidates"][0]["model"]
    entries[[e["name"] for e in entries].index("int8 LLM.int8()")]["batch_dependence"] = bnb_model[
        "batch_dependence"
    ]
    demo_kl = next(iter(candidates(demo).values()))["kl"]
    mean, half_width = demo_kl["mean"], Z95 * demo_kl["se"]
    demo_intervals = {
        "kl_mean": mean,
        "token_interval": [mean - half_width, mean + half_width],
        "bootstrap_ci": [demo_kl["ci_low"], demo_kl["ci_high"]],
    }

    from lmkl.version import __version__

    document = {
        "about": "mean KL(P‖Q) in nats measured by scripts/familiar_pairs.py on the demo models",
        "measured": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "lmkl": __version__,
        "pairs": entries,
        "demo": demo_intervals,
    }
    OUT_JSON.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    OUT_MD.write_text(familiar_pairs_markdown(entries) + "\n")
    print(f"wrote {OUT_JSON.relative_to(ROOT)} and {OUT_MD.relative_to(ROOT)}")
    print(OUT_MD.read_text())


if __name__ == "__main__":
    main()
