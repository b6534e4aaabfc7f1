"""``python -m transflow`` (also what ``torchrun -m transflow`` runs)."""

from .cli import run

run()
