"""Statistics over per-token results: summaries, bootstrap ranking, quality gates, metrics.

Pure NumPy, no model or tensor code: :mod:`.stats` turns per-token columns into the summary of
``results.json``; :mod:`.ranking` ranks candidates with document-level bootstrap intervals;
:mod:`.gates` checks pass/fail limits. Everything that names a summary metric resolves it here.
"""
