"""The ``lmkl`` command line: a thin Typer layer over the library.

Each command parses its options, calls one library function and maps errors to exit codes
(:mod:`.common`); torch and transformers are imported inside command bodies only, so
``lmkl --help`` stays instant. ``app`` is loaded on first use to keep imports of the package
light.
"""

from __future__ import annotations

from typing import Any


def main() -> None:
    """Console-script entry point."""
    from lmkl.cli.application import app

    app()


def __getattr__(name: str) -> Any:
    if name == "app":
        from lmkl.cli.application import app

        return app
    raise AttributeError(name)
