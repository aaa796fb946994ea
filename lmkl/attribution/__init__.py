"""Where in the model a candidate's KL comes from (``lmkl attribute``).

The candidate has the reference's module structure (a quantized copy, a fine-tune, a later
checkpoint). Each *unit* (one weight-holding module, one decoder layer, the layers ``0..l``) is
taken from the candidate into the reference, everything else stays the reference's, and the KL
of that hybrid against the reference is measured on the same tokens as ``compare`` would. The
reference runs once per batch; a unit in layer ``l`` runs only the layers from ``l`` on (see
:mod:`lmkl.attribution.substitute`).
"""
