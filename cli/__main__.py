"""``python -m mesimp.cli``: the ``mesimp`` command (what ``torchrun -m mesimp.cli`` runs)."""

from mesimp.cli.main import main

main()
