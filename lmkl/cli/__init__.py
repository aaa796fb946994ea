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
        keep_hyphenated_words_whole()
    app()


def keep_hyphenated_words_whole() -> None:
    """Click's plain help wraps at hyphens too, splitting ``--memory-budget`` and ``no-overwrite``
    over two lines: make its wrapper break at spaces only. Its ``TextWrapper`` is looked up each
    time a help text is wrapped; Typer carries its own copy of click (``typer._click``)."""
    import importlib

    for name in ("typer._click._textwrap", "click._textwrap"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        base = module.TextWrapper
        if getattr(base, "lmkl_whole_words", False):
            continue

        class WholeWordWrapper(base):  # type: ignore[misc, valid-type]
            lmkl_whole_words = True

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("break_on_hyphens", False)
                super().__init__(*args, **kwargs)

        module.TextWrapper = WholeWordWrapper


def __getattr__(name: str) -> Any:
    if name == "app":
        from lmkl.cli.application import app

        return app
    raise AttributeError(name)
