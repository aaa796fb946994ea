"""``python -m lmkl`` (also what ``torchrun ... -m lmkl`` runs)."""

from lmkl.cli import main

main()
