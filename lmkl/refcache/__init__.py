"""Reference caches: run the reference once, compare any number of candidates later.

A cache directory stands in for the reference model: exact mode keeps final hidden states and
the output layer (every number equals the live run's), top-k mode keeps each position's K most
likely tokens and the tail mass (KL reported as a guaranteed interval).
"""
