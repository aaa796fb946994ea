"""Graceful stopping: the first Ctrl-C (or SIGTERM) finishes the current part, the second stops now.

A long run is a loop of "score a batch, write its part". Raising ``KeyboardInterrupt`` in the
middle of a batch throws away the work of that batch; instead, while a :class:`GracefulStop` is
active, SIGINT and SIGTERM only set a flag that the loop checks after each durable part. A second
signal raises ``KeyboardInterrupt`` at once (the part being written is then discarded: parts are
written atomically, so it simply does not exist yet).

Handlers can only be installed from the main thread; elsewhere (e.g. a notebook worker thread) the
context does nothing and signals keep their usual behaviour.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None
)
_active: list[GracefulStop] = []


class GracefulStop:
    """Context manager turning the first SIGINT/SIGTERM into a stop request (see module doc)."""

    def __init__(self, on_request: Callable[[str], None] | None = None) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._on_request = on_request
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        _active.append(self)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if self._on_request:
            self._on_request(self.signal_name)

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self in _active:
            _active.remove(self)


def stop_requested() -> bool:
    """Whether a stop has been requested in the innermost active :class:`GracefulStop`."""
    return bool(_active) and _active[-1].requested
