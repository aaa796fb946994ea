"""The results envelope every run kind shares: schema version, kind, provenance, throughput.

``results.json`` of any run is ``{"schema_version", "kind", "token_level", ...the kind's own
fields..., "provenance", "throughput"}``. Every reader of a run directory's JSON (results.json,
progress.json, the marker) checks ``schema_version`` with :func:`check_schema` and refuses a
newer or unknown one in one line; version 2 added ``kind`` and ``token_level`` to every run
(version 1 had them only on some kinds).
"""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

from lmkl.environment import versions
from lmkl.errors import OutputError

#: Version of the results.json / run-directory layout. Bump it on any change of names or fields.
SCHEMA_VERSION = 2
#: The versions this lmkl reads (older ones stay readable: readers default missing fields).
READABLE_SCHEMAS = frozenset({1, 2})


def check_schema(data: dict[str, Any], path: Any, what: str, *, required: bool = True) -> None:
    """Refuse (one line) a run file whose ``schema_version`` this lmkl cannot read.

    ``required=False`` accepts a file without the field (progress.json and the marker carry
    it only since lmkl recorded it there; results.json always has).
    """
    version = data.get("schema_version")
    if version is None and not required:
        return
    # Anything but a whole number (a damaged file: a list, a string) is refused below, in one
    # line; a membership test on it could raise TypeError (unhashable) instead.
    whole = isinstance(version, int) and not isinstance(version, bool)
    if whole and version in READABLE_SCHEMAS:
        return
    if whole and version > SCHEMA_VERSION:
        raise OutputError(
            f"{what} '{path}' has schema version {version}, newer than this lmkl reads "
            f"({SCHEMA_VERSION}); it was written by a newer lmkl",
            "upgrade lmkl (pip install -U lmkl) to read it",
        )
    shown = "none" if version is None else repr(version)
    raise OutputError(
        f"{what} '{path}' has an unknown schema version ({shown}); it was not written by lmkl "
        "or is damaged",
        "pass a file that lmkl wrote, or rerun the command that writes it",
    )


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
