"""What a run depends on: versions, the CPU and which meProp path runs (``mesimp info --env``).

The first thing to look at when meProp is slower than expected: whether the compiled
kernels loaded (and from where: the install, the per-user cache, or a first-use build),
and if not, why, with the command that builds them.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

from mesimp._version import __version__
from mesimp.deploy.timing import cpu_model
from mesimp.nn import kernels


def environment() -> dict[str, Any]:
    """The ``info --env`` object (its fields: docs/file-formats.md, JSON schemas)."""
    return {
        "mesimp": __version__,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "cuda": torch.cuda.is_available(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "kernels": kernels.info(),
    }
