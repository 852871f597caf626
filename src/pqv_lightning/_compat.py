"""Old module paths of the flat 0.1 layout, kept importable with a ``DeprecationWarning``.

``import pqv_lightning.importance`` (and the other names in :data:`MOVED`) still works: a finder on
``sys.meta_path`` answers for the old name with a thin module that forwards every attribute to the
module's new home, so ``pqv_lightning.importance.make_importance is
pqv_lightning.pruning.importance.make_importance``. Checkpoints never stored these paths (the
pruning state is plain dicts), so only code that imports them is affected.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

__all__ = ["MOVED"]

#: old module name -> new module name
MOVED: dict[str, str] = {
    "pqv_lightning.importance": "pqv_lightning.pruning.importance",
    "pqv_lightning.sparsity": "pqv_lightning.pruning.sparsity",
    "pqv_lightning.optim": "pqv_lightning.pruning.optim",
    "pqv_lightning.adapters": "pqv_lightning.pruning.adapters",
    "pqv_lightning.checkpoint": "pqv_lightning.callbacks.checkpoint",
    "pqv_lightning.benchmark": "pqv_lightning.export.benchmark",
    "pqv_lightning.cli": "pqv_lightning.apps.cli",
    "pqv_lightning.demo": "pqv_lightning.apps.demo",
    "pqv_lightning.recipes": "pqv_lightning.apps.recipes",
    "pqv_lightning.sweep": "pqv_lightning.apps.sweep",
    "pqv_lightning.sweep_report": "pqv_lightning.apps.sweep_report",
    "pqv_lightning.plots": "pqv_lightning.apps.plots",
    "pqv_lightning.lightning_cli": "pqv_lightning.apps.lightning_cli",
}


class _Forward(types.ModuleType):
    def __init__(self, name: str, target: types.ModuleType) -> None:
        super().__init__(name, target.__doc__)
        self.__target = target

    def __getattr__(self, attr: str):
        return getattr(self.__target, attr)

    def __dir__(self) -> list[str]:
        return dir(self.__target)


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path will be removed in a future release",
                      DeprecationWarning, stacklevel=2)
        return _Forward(spec.name, importlib.import_module(new))

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
