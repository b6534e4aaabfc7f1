"""``python -m transflow`` (also what ``torchrun -m transflow`` runs)."""

import sys

from .cli import main

sys.exit(main())
