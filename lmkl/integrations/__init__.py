"""Integrations with training frameworks: exact held-out KL to a teacher, measured while training.

:mod:`lmkl.integrations.transformers` holds :class:`~lmkl.integrations.transformers.KLCallback`,
a ``transformers.TrainerCallback`` (so it works with ``Trainer`` and the TRL trainers built on
it). Custom loops call :func:`lmkl.score_against` directly; both score through the engine's
token comparison, so the numbers are those ``lmkl compare`` gives for the same checkpoint.
Nothing here is imported by ``import lmkl``.
"""
