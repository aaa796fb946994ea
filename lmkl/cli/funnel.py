"""The error funnel: every command's exceptions become one line, a fix and a documented exit code.

:class:`~lmkl.errors.LmklError` prints ``error: <message>`` and ``fix: <hint>`` with no
traceback (``LMKL_DEBUG=1`` raises instead); a full disk is named as such; anything else is an
internal error to report. lmkl's own warnings print as one ``warning:`` line.
"""

from __future__ import annotations

import errno
import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.markup import escape

from lmkl.cli.output import stderr
from lmkl.errors import EXIT_RUNTIME, ConfigError, GateFailure, LmklError, LmklWarning

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("LMKL_DEBUG", "") not in ("", "0", "false")


def report_error(exc: BaseException) -> int:
    """Print one line (plus a fix) for ``exc`` and return the exit code to use."""
    if isinstance(exc, LmklError):
        # Messages are plain text: "pip install 'lmkl[quant]'" is not rich markup.
        stderr.print(
            f"[bold red]error:[/bold red] {escape(exc.message)}", highlight=False, soft_wrap=True
        )
        if isinstance(exc, ConfigError | GateFailure):
            for problem in exc.problems:
                stderr.print(f"  {escape(str(problem))}", highlight=False, soft_wrap=True)
        if exc.hint:
            stderr.print(f"[bold]fix:[/bold] {escape(exc.hint)}", highlight=False, soft_wrap=True)
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
        f"[bold red]error:[/bold red] internal error: {type(exc).__name__}: {escape(first)}",
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
            f"[bold yellow]warning:[/bold yellow] {escape(str(message))}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        original(message, category, *args, **kwargs)


def friendly_errors(func: F) -> F:
    """Turn exceptions into one-line messages and documented exit codes (LMKL_DEBUG=1: raise)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lmkl.api import command_line_caller

        try:
            # (command_line_caller: errors from lmkl.api keep naming this command's flags)
            with warnings.catch_warnings(), command_line_caller():  # restores showwarning after
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
