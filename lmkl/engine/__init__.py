"""The run engine: one loop, one run-directory lifecycle, one results envelope for every kind.

A run kind (token comparison, per-byte comparison across tokenizers, sampled KL, building a
reference cache) supplies how one part is scored and how parts are summarized; the engine
validates inputs and the output directory before touching anything, records and checks the run
identity on resume, writes durable parts, stops gracefully, shares parts across processes and
writes ``results.json``.
"""
