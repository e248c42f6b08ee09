"""``python -m polytask``: the command line (what ``torchrun -m polytask run CONFIG`` starts on every rank)."""

from polytask.cli import entrypoint

entrypoint()
