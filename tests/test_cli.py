"""The command line, driven through Typer's runner and as a real subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from typer.testing import CliRunner

from lmkl import __version__
from lmkl.cli import app

runner = CliRunner()


def test_version_and_help_are_instant_and_import_no_torch():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    code = (
        "import sys, lmkl.cli; assert 'torch' not in sys.modules; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


COMMANDS = [
    "compare", "cache", "sample-kl", "run", "select", "report", "inspect", "validate", "init",
    "demo",
]  # fmt: skip


def test_every_help_page_fits_80_columns_and_a_pipe_uncut():
    # As users read it: `lmkl CMD --help` in an 80-column terminal, and piped to a file (no
    # terminal: 80 columns). Rich's tables cut option names and help with "…" there; nothing
    # may be cut and no line may run past the width.
    import os

    pages = []
    for command in ["", *COMMANDS]:
        for env in ({"COLUMNS": "80"}, {}):
            base = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
            done = subprocess.run(
                [sys.executable, "-m", "lmkl", *command.split(), "--help"],
                capture_output=True,
                text=True,
                env=base | env,
                check=True,
            )
            pages.append((command, done.stdout))
    for command, page in pages:
        assert "…" not in page, (command, [line for line in page.splitlines() if "…" in line])
        assert max(len(line) for line in page.splitlines()) <= 80, command
    # Every option of compare is there by its full name, with its help.
    compare = dict(pages)["compare"]
    for option in ("--attn-implementation", "--different-tokenizers", "--quantize", "--label"):
        assert option in compare, option
    assert "torchao:int4_weight_only:g32" in compare and "lmkl[quant]" in compare
    # Click's wrapper broke words at hyphens too: "--memory-" / "budget", "no-" / "rebuild".
    for command, page in pages:
        split = [line for line in page.splitlines() if re.search(r"[a-z]-$", line)]
        assert not split, (command, split)


def test_wide_help_pages_show_text_as_written():
    # From 120 columns the rich layout: "[quant]" was read as a style tag ("Needs lmkl."),
    # every flag showed "<bool>", and a docstring's line breaks split sentences. In-process:
    # the wide layout is the app's own (only `main` switches narrow pages to plain help).
    pages = {
        command: runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"}).output
        for command in ["", *COMMANDS]
    }
    for command, page in pages.items():
        assert "Usage:" in page and "…" not in page and "<bool>" not in page, command
    assert "lmkl[quant]" in pages["compare"] and "Needs lmkl." not in pages["compare"]
    assert "options (--out, --limit, --fail-above/--fail-below) beat" in pages["run"]


def test_compare_end_to_end(tiny_pair, small_jsonl, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(small_jsonl),
            "--out",
            str(out),
            "-c",
            "64",
            "--max-tokens",
            "300",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "KL(P‖Q) mean [95% CI]" in result.output  # the document bootstrap, every run
    results = json.loads((out / "results.json").read_text())
    assert results["candidates"][0]["metrics"]["counts"]["tokens"] == 300
    assert (out / "tokens.parquet").exists() and (out / "config.yaml").exists()
    # Refuses to overwrite, with a one-line error and exit code 1.
    again = runner.invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(small_jsonl),
            "--out",
            str(out),
        ],
    )
    assert again.exit_code == 1
    assert "already holds a run" in again.output and "Traceback" not in again.output


def test_missing_model_is_one_line_error(tiny_pair, small_jsonl, tmp_path):
    result = runner.invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tmp_path / "nope"),
            "--data",
            str(small_jsonl),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # a run that fails on its inputs leaves nothing


def test_no_data_is_usage_error(tiny_pair, tmp_path):
    result = runner.invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert "--data" in result.output


def test_bad_stride_is_usage_error(tiny_pair, small_jsonl, tmp_path):
    result = runner.invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(small_jsonl),
            "-c",
            "16",
            "--stride",
            "16",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert "stride" in result.output


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmkl",
            "compare",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--data",
            str(tmp_path / "x.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--offline",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
