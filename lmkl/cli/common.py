"""What every command shares: the error funnel, the consoles, option aliases declared once."""

from __future__ import annotations

import errno
import functools
import os
import sys
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from lmkl.errors import EXIT_RUNTIME, ConfigError, GateFailure, LmklError, LmklWarning

F = TypeVar("F", bound=Callable[..., Any])

#: Results go to stdout; messages, progress and errors to stderr.
stdout = Console()
stderr = Console(stderr=True)


def debug_enabled() -> bool:
    return os.environ.get("LMKL_DEBUG", "") not in ("", "0", "false")


def report_error(exc: BaseException) -> int:
    """Print one line (plus a fix) for ``exc`` and return the exit code to use."""
    if isinstance(exc, LmklError):
        stderr.print(f"[bold red]error:[/bold red] {exc.message}", highlight=False, soft_wrap=True)
        if isinstance(exc, ConfigError | GateFailure):
            for problem in exc.problems:
                stderr.print(f"  {problem}", highlight=False, soft_wrap=True)
        if exc.hint:
            stderr.print(f"[bold]fix:[/bold] {exc.hint}", highlight=False, soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        stderr.print(
            "[bold red]error:[/bold red] the disk is full; completed parts are kept",
            highlight=False,
        )
        stderr.print("[bold]fix:[/bold] free space, then rerun with --resume", highlight=False)
        return EXIT_RUNTIME
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    stderr.print(
        f"[bold red]error:[/bold red] internal error: {type(exc).__name__}: {first}",
        highlight=False,
        soft_wrap=True,
    )
    stderr.print(
        "[bold]fix:[/bold] rerun with LMKL_DEBUG=1 for the traceback and report it", highlight=False
    )
    return EXIT_RUNTIME


def _show_warning(
    original: Callable[..., None],
    message: Warning | str,
    category: type[Warning],
    *args: Any,
    **kwargs: Any,
) -> None:
    """lmkl's own warnings as one line (``warning: ...``); others as Python prints them."""
    if issubclass(category, LmklWarning):
        stderr.print(
            f"[bold yellow]warning:[/bold yellow] {message}", highlight=False, soft_wrap=True
        )
    else:
        original(message, category, *args, **kwargs)


def friendly_errors(func: F) -> F:
    """Turn exceptions into one-line messages and documented exit codes (LMKL_DEBUG=1: raise)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():  # restores showwarning afterwards
                original = warnings.showwarning
                warnings.showwarning = functools.partial(_show_warning, original)
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            stderr.print("[bold red]interrupted[/bold red]")
            raise typer.Exit(130) from None
        except Exception as exc:
            if debug_enabled():
                raise
            raise typer.Exit(report_error(exc)) from None

    return wrapper  # type: ignore[return-value]


def apply_offline(offline: bool) -> None:
    """Set the Hugging Face offline variables before any HF import (they are read at import)."""
    if offline or os.environ.get("LMKL_OFFLINE") == "1":
        from lmkl.models import set_offline

        set_offline(True)


def is_interactive(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class WindowingMode(str, Enum):
    documents = "documents"
    llama_cpp = "llama-cpp"


MODELS = "Models"
DATA = "Data"
WINDOWS = "Windows"
COMPUTE = "Compute"
OUTPUT = "Output"

# Shared option aliases: declared once, reused by every command that needs them.
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="Hub dataset, local .txt/.jsonl/.json/.csv/.parquet, or save_to_disk dir.",
        rich_help_panel=DATA,
    ),
]
SplitOpt = Annotated[
    str | None,
    typer.Option(help="Dataset split (default: the only one, else 'test').", rich_help_panel=DATA),
]
DatasetConfigOpt = Annotated[
    str | None,
    typer.Option("--dataset-config", help="Hub dataset configuration name.", rich_help_panel=DATA),
]
TextFieldOpt = Annotated[
    str, typer.Option("--text-field", help="Column holding the text.", rich_help_panel=DATA)
]
MaxSamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--max-samples", min=1, help="Use only the first N documents.", rich_help_panel=DATA
    ),
]
MaxTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-tokens", min=1, help="Stop after this many scored tokens.", rich_help_panel=DATA
    ),
]
ContextOpt = Annotated[
    int,
    typer.Option(
        "--context-length", "-c", min=2, help="Tokens per model input.", rich_help_panel=WINDOWS
    ),
]
StrideOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="New tokens scored per sliding window (documents mode; default: half the context).",
        rich_help_panel=WINDOWS,
    ),
]
WindowingOpt = Annotated[
    WindowingMode,
    typer.Option(
        help="documents: each document alone; llama-cpp: llama-perplexity's chunks (second half "
        "scored).",
        rich_help_panel=WINDOWS,
    ),
]
DTypeOpt = Annotated[
    DType, typer.Option(help="Weights dtype for both models.", rich_help_panel=MODELS)
]
RefDTypeOpt = Annotated[
    DType | None,
    typer.Option(
        "--reference-dtype", help="Override --dtype for the reference.", rich_help_panel=MODELS
    ),
]
CandDTypeOpt = Annotated[
    DType | None,
    typer.Option(
        "--candidate-dtype", help="Override --dtype for the candidate.", rich_help_panel=MODELS
    ),
]
DeviceOpt = Annotated[
    str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=MODELS)
]
RevisionOpt = Annotated[
    str | None, typer.Option(help="Hub revision for both models.", rich_help_panel=MODELS)
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run code shipped with the checkpoints (off by default).",
        rich_help_panel=MODELS,
    ),
]
AttnOpt = Annotated[
    str | None,
    typer.Option(
        "--attn-implementation", help="eager, sdpa, flash_attention_2, ...", rich_help_panel=MODELS
    ),
]
AdapterOpt = Annotated[
    str | None, typer.Option(help="PEFT adapter applied to the candidate.", rich_help_panel=MODELS)
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Allow pickle weight files (can run code).", rich_help_panel=MODELS
    ),
]
OfflineOpt = Annotated[
    bool, typer.Option(help="Never touch the network (HF offline mode).", rich_help_panel=MODELS)
]
BatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size", "-b", min=1, help="Windows per forward pass.", rich_help_panel=COMPUTE
    ),
]
ChunkOpt = Annotated[
    int | None,
    typer.Option(
        "--chunk-tokens",
        min=1,
        help="Tokens per KL chunk (default: from --memory-budget).",
        rich_help_panel=COMPUTE,
    ),
]
MemoryOpt = Annotated[
    int,
    typer.Option(
        "--memory-budget",
        min=16,
        help="MiB for the KL stage's temporaries.",
        rich_help_panel=COMPUTE,
    ),
]
MaxBatchTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-batch-tokens",
        min=1,
        help="Sort windows by length and fill each batch up to this many "
        "padded tokens (instead of --batch-size consecutive windows).",
        rich_help_panel=COMPUTE,
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the fused KL kernel on large runs (falls back "
        "to eager if compilation fails).",
        rich_help_panel=COMPUTE,
    ),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Spread each model over the available devices (e.g. 'auto'; needs accelerate).",
        rich_help_panel=MODELS,
    ),
]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        min=1e-6, help="Compare softened distributions (1 = as is).", rich_help_panel=COMPUTE
    ),
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Run directory to write.", rich_help_panel=OUTPUT)
]
OverwriteOpt = Annotated[
    bool, typer.Option(help="Replace an existing run directory.", rich_help_panel=OUTPUT)
]
ResumeOpt = Annotated[
    bool, typer.Option(help="Continue an interrupted run in --out.", rich_help_panel=OUTPUT)
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print only the run directory.", rich_help_panel=OUTPUT),
]
FailAboveOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-above",
        metavar="METRIC=VALUE",
        help="Exit 3 if a candidate's metric is above VALUE, "
        "e.g. kl.mean=0.05 or kl.p99=2 (repeatable).",
        rich_help_panel=OUTPUT,
    ),
]
FailBelowOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-below",
        metavar="METRIC=VALUE",
        help="Exit 3 if a candidate's metric is below VALUE, e.g. top1_agreement=0.9 (repeatable).",
        rich_help_panel=OUTPUT,
    ),
]


class TokenProgress:
    """A rich progress bar with tokens/s on stderr; silent when quiet or not a terminal."""

    def __init__(self, quiet: bool, description: str = "scoring") -> None:
        self.enabled = is_interactive(quiet)
        self.description = description
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> TokenProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} tok/s"),
                TimeRemainingColumn(),
                console=stderr,
                transient=True,
            )
            self._progress.__enter__()
        return self

    def __call__(self, done: int, total: int) -> None:
        if not self._progress:
            return
        if self._task is None:
            self._task = self._progress.add_task(self.description, total=total, rate="–")
        task = self._progress.tasks[0]
        elapsed = task.elapsed or 0.0
        rate = f"{done / elapsed:,.0f}" if elapsed > 0 else "–"
        self._progress.update(self._task, completed=done, total=total, rate=rate)

    def log(self, message: str) -> None:
        if self.enabled:
            stderr.print(f"[dim]{message}[/dim]")

    def __exit__(self, *exc: Any) -> None:
        if self._progress:
            self._progress.__exit__(*exc)


def model_pair(
    reference: str,
    candidate: str,
    dtype: DType,
    reference_dtype: DType | None,
    candidate_dtype: DType | None,
    adapter: str | None = None,
    **common: Any,
) -> tuple[Any, Any]:
    """Reference and candidate ModelSpecs from the shared model options.

    Per-model dtypes override ``dtype``; the adapter applies to the candidate only. Two models
    with the same display name are relabelled ``reference``/``candidate`` so tables stay readable.
    """
    from lmkl.specs import ModelSpec

    ref_spec = ModelSpec(model=reference, dtype=(reference_dtype or dtype).value, **common)
    cand_spec = ModelSpec(
        model=candidate, dtype=(candidate_dtype or dtype).value, adapter=adapter, **common
    )
    if ref_spec.display_name == cand_spec.display_name:
        ref_spec = ref_spec.model_copy(update={"label": "reference"})
        cand_spec = cand_spec.model_copy(update={"label": "candidate"})
    return ref_spec, cand_spec
