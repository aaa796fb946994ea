"""Per-token scoring math: the divergence definitions and their fast fused twin.

:mod:`.divergence` is the reference definition (pure torch, no Hugging Face import) of KL both
ways, JSD, entropy, NLL and agreement per token; :mod:`.fused` computes the same numbers in fewer
passes over the vocabulary (optionally ``torch.compile``-d) and falls back to the definition.
"""
