"""Helpers shared by the test files (imported as ``helpers``: pytest puts ``tests/`` on
``sys.path``, since it is not a package)."""

from __future__ import annotations

from pathlib import Path

import mesimp.cli.commands  # noqa: F401  (registers the commands)
import mesimp.cli.export_bench  # noqa: F401
import pytest
from mesimp.cli.main import main


def run_main(capsys, *args: object) -> tuple[int, str, str]:
    """The console entry point in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = e.value.code
    return (0 if code is None else code), out, err


def files_in(d: Path) -> set[str]:
    """Every path under ``d``, relative to it (to see that nothing half-written is left)."""
    return {str(p.relative_to(d)) for p in d.rglob("*")}
