"""Reading finished runs back: the report model, its figures and its renderings.

:mod:`.model` loads run directories into a :class:`~lmkl.report.model.Report` (no rendering);
:mod:`.plots` draws its figures, :mod:`.render` writes HTML/Markdown/JSON, :mod:`.terminal` and
:mod:`.leaderboard` print rich tables, :mod:`.drilldown` colours a document by per-token KL.
"""
