"""Reading finished runs back: the report model, its figures and its renderings.

:mod:`.build` reads run directories (:mod:`.runs`) into the report's data, a
:class:`~lmkl.report.data.Report` of :mod:`.candidates` with a plain-language :mod:`.reading`
(aggregations over tokens are :mod:`lmkl.analysis.per_token`; nothing here renders);
:mod:`.plots` draws its figures, :mod:`.render` writes HTML/Markdown/JSON, :mod:`.tables` builds
the rich tables of a results.json and :mod:`.terminal` prints them, :mod:`.drilldown` colours a
document by per-token KL.
"""
