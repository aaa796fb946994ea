"""Reading finished runs back: the report model, its figures and its renderings.

:mod:`.model` loads run directories into a :class:`~lmkl.report.model.Report` (no rendering);
:mod:`.plots` draws its figures, :mod:`.render` writes HTML/Markdown/JSON, :mod:`.tables` builds
the rich tables of a results.json and :mod:`.terminal` prints them, :mod:`.drilldown` colours a
document by per-token KL.
"""
