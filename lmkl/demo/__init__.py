"""The embedded default: a tokenizer and two small causal LMs trained offline for ``lmkl demo``.

Built deterministically from text every CPython ships, cached per user, and addressable in YAML
experiments as ``demo:reference``, ``demo:candidate`` and ``demo:heldout``.
"""
