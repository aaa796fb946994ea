"""What commands print: the two consoles, progress bars, and the summary of a finished run."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console, ConsoleRenderable, RenderHook
from rich.text import Text

from lmkl.formatting import format_rate


class FitTables(RenderHook):
    """Every table a command prints fits the width (80 columns in a pipe) without a cut
    number, header or label: see :class:`lmkl.report.tables.FittedTable`."""

    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        from lmkl.report.tables import fitted

        return [fitted(r) for r in renderables]


#: Results go to stdout; messages, progress and errors to stderr. lmkl writes no ``:emoji:``
#: codes itself, so none are expanded: a label or path such as ``q:100:`` prints as typed. User
#: text (labels, paths, messages quoting them) is printed as ``Text`` or escaped, never as markup.
stdout = Console(emoji=False)
stderr = Console(stderr=True, emoji=False)
stdout.push_render_hook(FitTables())


def is_notice(message: str) -> bool:
    """A log line printed also when output is piped (CI logs): that a run resumes."""
    from lmkl.engine.loop import RESUMING

    return message.startswith(RESUMING)


def is_interactive(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


class TokenProgress:
    """A rich progress bar with tokens/s on stderr; silent when quiet or not a terminal."""

    def __init__(self, quiet: bool, description: str = "scoring") -> None:
        self.enabled = is_interactive(quiet)
        self.shown = not quiet
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
        # The first reading is one batch over microseconds: no rate until a second has passed.
        rate = format_rate(done, task.elapsed or 0.0, unit="")
        self._progress.update(self._task, completed=done, total=total, rate=rate)

    def log(self, message: str) -> None:
        if self.enabled or (self.shown and is_notice(message)):
            stderr.print(Text(message, style="dim"))

    def __exit__(self, *exc: Any) -> None:
        if self._progress:
            self._progress.__exit__(*exc)


class DatasetProgress:
    """One rich progress bar per dataset (silent when quiet or not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.current: str | None = None
        self.bar: TokenProgress | None = None

    def __call__(self, dataset: str, done: int, total: int) -> None:
        if dataset != self.current:
            self.close()
            self.current = dataset
            self.bar = TokenProgress(self.quiet, description=f"scoring {dataset}").__enter__()
        assert self.bar is not None
        self.bar(done, total)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.log(message)
        elif not self.quiet and (stderr.is_terminal or is_notice(message)):
            stderr.print(Text(message, style="dim"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def __enter__(self) -> DatasetProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def show_path(name: str, path: Any, quiet: bool) -> None:
    """``name: PATH`` on stdout, or only ``PATH`` when quiet (what scripts capture).

    The path is printed as it is: never parsed as markup, never wrapped onto a second line.
    """
    text = Text(str(path)) if quiet else Text.assemble(f"{name}: ", (str(path), "bold"))
    stdout.print(text, soft_wrap=True)


def show_run(run: Any, quiet: bool, printer: Any) -> None:
    """Print a finished run: its summary table (``printer``) and directory, or only the path."""
    if not quiet:
        printer(run.results, stdout)
    show_path("run directory", run.path, quiet)
