"""The results envelope every run kind shares: schema version, kind, provenance, throughput.

``results.json`` of any run is ``{"schema_version", "kind", "token_level", ...the kind's own
fields..., "provenance", "throughput"}``. Readers check ``schema_version``; version 2 added
``kind`` and ``token_level`` to every run (version 1 had them only on some kinds).
"""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

from lmkl.environment import versions

#: Version of the results.json / run-directory layout. Bump it on any change of names or fields.
SCHEMA_VERSION = 2


def provenance(
    config: dict[str, Any], started: _dt.datetime, ended: _dt.datetime
) -> dict[str, Any]:
    """The ``provenance`` block of results.json: versions, times, full options, host."""
    return {
        "versions": versions(),
        "started": started.isoformat(),
        "ended": ended.isoformat(),
        "options": config,
        "host": platform.node(),
    }


def envelope(
    kind: str,
    token_level: bool,
    body: dict[str, Any],
    config: dict[str, Any],
    started: _dt.datetime,
    ended: _dt.datetime,
    throughput: dict[str, Any],
) -> dict[str, Any]:
    """A complete results.json object around a run kind's own fields."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "token_level": token_level,
        **body,
        "provenance": provenance(config, started, ended),
        "throughput": throughput,
    }


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)
