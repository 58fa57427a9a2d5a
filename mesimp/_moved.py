"""Old module paths (before the package had pipeline folders) still import, with a
``DeprecationWarning`` naming the new path: ``import mesimp.checkpoint_shrink`` gives
``mesimp.simplify.checkpoint_shrink``. ``import mesimp`` itself never changed."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    "mesimp.atomic": "mesimp.files.atomic",
    "mesimp.checkpoint": "mesimp.files.checkpoint",
    "mesimp.model_file": "mesimp.files.model_file",
    "mesimp.seqdata": "mesimp.data.tasks",
    "mesimp.tagging": "mesimp.training.sequence",
    "mesimp.seqtrain": "mesimp.training.sequence",
    "mesimp.meprop": "mesimp.nn.meprop",
    "mesimp.layers": "mesimp.nn.linear",
    "mesimp.conv": "mesimp.nn.conv",
    "mesimp.lstm": "mesimp.nn.lstm",
    "mesimp.swap": "mesimp.nn.swap",
    "mesimp.optim": "mesimp.training.optim",
    "mesimp.runsafety": "mesimp.training.runsafety",
    "mesimp.report": "mesimp.training.report",
    "mesimp.simplifier": "mesimp.simplify.simplifier",
    "mesimp.coupling": "mesimp.simplify.coupling",
    "mesimp.graph_shrink": "mesimp.simplify.graph_shrink",
    "mesimp.lstm_pruner": "mesimp.simplify.lstm_pruner",
    "mesimp.checkpoint_shrink": "mesimp.simplify.checkpoint_shrink",
    "mesimp.export_module": "mesimp.deploy.export_module",
    "mesimp.int8": "mesimp.deploy.int8",
    "mesimp.info": "mesimp.models.info",
    # ``mesimp.train``, ``mesimp.bench``, ``mesimp.export`` and ``mesimp.shrink`` are
    # the public functions of those names; their modules moved to
    # mesimp.training.loop, mesimp.deploy.bench, mesimp.deploy.export and
    # mesimp.simplify.graph_shrink.
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; import it from there (or use `import mesimp`)",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is the new one, already imported."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        new = MOVED.get(name)
        if new is None:
            return None
        return importlib.util.spec_from_loader(name, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
