"""Errors a user can cause, each with a one-line message, a fix and an exit code.

The CLI catches :class:`LmklError` and prints ``error: <message>`` plus ``fix: <hint>`` with no
traceback (``LMKL_DEBUG=1`` shows it). Library callers get ordinary exceptions.

Exit codes (documented in README, "Troubleshooting"):

====  =====================================================================
0     success
1     a known runtime problem (model, tokenizer, data, output, numerics)
2     usage or configuration error (bad option, bad YAML, bad override)
3     a quality gate failed (``--fail-above`` / ``--fail-below`` / ``gates:``)
75    busy: another process holds the run directory or cache (see :mod:`lmkl.files`); retry
      once it has finished
130   interrupted (Ctrl-C); completed parts are kept and ``--resume`` continues
====  =====================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_GATE = 3
#: sysexits' EX_TEMPFAIL: a scheduler can tell "another copy is running" from a failure.
EXIT_BUSY = 75
EXIT_INTERRUPTED = 130


class LmklError(Exception):
    """Base class for errors caused by input or environment, not by a bug in lmkl."""

    exit_code: int = EXIT_RUNTIME

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (fix: {self.hint})"


class UsageError(LmklError):
    """An option or argument is invalid."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A configuration file or override is invalid; ``problems`` lists every issue at once."""

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None):
        super().__init__(message, hint)
        self.problems = problems or []


class ModelLoadError(LmklError):
    """A model or tokenizer cannot be found, loaded or used."""


class TokenizerMismatchError(LmklError):
    """Two models do not share one vocabulary, so token-level KL is undefined."""


class DataError(LmklError):
    """A dataset is missing, unreadable, in the wrong format or has no usable text."""


class OutputError(LmklError):
    """The output directory cannot be written, or would overwrite an earlier run."""


class ResumeError(LmklError):
    """A run cannot be resumed (missing, finished, or started with other options)."""


class Busy(LmklError):
    """Another process holds the directory's lock (a second copy of the same job)."""

    exit_code = EXIT_BUSY


class GateFailure(LmklError):
    """One or more candidates failed a quality gate; ``problems`` has one line per candidate."""

    exit_code = EXIT_GATE

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None):
        super().__init__(message, hint)
        self.problems = problems or []


class Interrupted(LmklError):
    """The run was stopped by the user after flushing what it had computed."""

    exit_code = EXIT_INTERRUPTED


class LmklWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints one line)."""
