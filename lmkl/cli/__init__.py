"""The ``lmkl`` command line: a thin Typer layer over the library.

Each command parses its options, calls one library function and maps errors to exit codes
(:mod:`.common`); torch and transformers are imported inside command bodies only, so
``lmkl --help`` stays instant. ``app`` is loaded on first use to keep imports of the package
light.
"""

from __future__ import annotations

from typing import Any

#: Rich's help tables cut option names and help text with "…" below this many columns; there
#: click's plain help (which wraps and never cuts) is shown instead.
RICH_HELP_MIN_COLUMNS = 120


def main() -> None:
    """Console-script entry point."""
    import shutil

    from lmkl.cli.application import app

    # The width a help page is printed at (COLUMNS, else the terminal's; 80 when piped).
    if shutil.get_terminal_size((80, 24)).columns < RICH_HELP_MIN_COLUMNS:
        app.rich_markup_mode = None
    app()


def __getattr__(name: str) -> Any:
    if name == "app":
        from lmkl.cli.application import app

        return app
    raise AttributeError(name)
