"""``load_from_checkpoint`` for pruned LightningModules (the Lightning side of
:mod:`pqv_lightning.pruning.checkpoint`)."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl

from ..checks import first_line
from ..errors import ConfigError, InputNotFoundError
from ..pruning.checkpoint import CHECKPOINT_KEY, check_checkpoint_shapes, restore_pruned_module

__all__ = ["CHECKPOINT_KEY", "check_checkpoint_shapes", "load_pruned_checkpoint", "restore_pruned_module"]

M = TypeVar("M", bound=pl.LightningModule)


@contextlib.contextmanager
def _pre_load_hook(module_class: type[pl.LightningModule]) -> Iterator[None]:
    # load_from_checkpoint builds the module (unpruned shapes) and then calls on_load_checkpoint before
    # load_state_dict: the one moment to reshape it. The hook goes on the class because the instance
    # does not exist before; it is removed again when the load returns.
    had_own = "on_load_checkpoint" in module_class.__dict__
    original = module_class.on_load_checkpoint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_pruned_module(self, checkpoint)
        original(self, checkpoint)

    module_class.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_own:
            module_class.on_load_checkpoint = original  # type: ignore[method-assign]
        else:
            del module_class.on_load_checkpoint


def load_pruned_checkpoint(module_class: type[M], checkpoint_path: str | Path, **kwargs: Any) -> M:
    """``module_class.load_from_checkpoint(checkpoint_path, **kwargs)`` that understands pruned shapes.

    Works with full and weights-only checkpoints written under :class:`StructuredPruning`, and with
    ordinary checkpoints (then it is exactly ``load_from_checkpoint``). ``kwargs`` go to
    ``load_from_checkpoint`` (``map_location``, ``strict``, hyper-parameter overrides, ...).

    Example::

        model = load_pruned_checkpoint(LitClassifier, "checkpoints/last.ckpt", map_location="cpu")
    """
    if isinstance(module_class, pl.LightningModule):
        name = type(module_class).__name__
        raise ConfigError(
            f"module_class is an instance of {name}; pass the class itself: load_pruned_checkpoint({name}, path)"
        )
    if not (isinstance(module_class, type) and issubclass(module_class, pl.LightningModule)):
        raise ConfigError(f"module_class={module_class!r} must be a LightningModule subclass")
    if not isinstance(checkpoint_path, (str, os.PathLike)) or not Path(checkpoint_path).is_file():
        raise InputNotFoundError(f"checkpoint_path={str(checkpoint_path)!r} does not exist")
    if Path(checkpoint_path).stat().st_size == 0:
        raise ConfigError(f"checkpoint_path={str(checkpoint_path)!r} is an empty file, not a checkpoint")
    where = f"checkpoint_path={str(checkpoint_path)!r}"
    try:
        with _pre_load_hook(module_class):
            return module_class.load_from_checkpoint(checkpoint_path, **kwargs)
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not a torch checkpoint ({first_line(exc)})") from None
    except KeyError as exc:
        if exc.args and exc.args[0] in ("pytorch-lightning_version", "state_dict"):
            raise ConfigError(
                f"{where} is not a Lightning checkpoint (no {exc.args[0]!r} entry; a plain state_dict "
                "loads with module.load_state_dict(torch.load(path)))"
            ) from None
        raise
    except RuntimeError as exc:
        text = str(exc)
        if "PytorchStreamReader" in text:
            raise ConfigError(f"{where} is not a torch checkpoint ({first_line(exc)})") from None
        if "Error(s) in loading state_dict" in text:
            problems = [line.strip() for line in text.splitlines()[1:] if line.strip()]
            shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            raise ConfigError(
                f"{where} does not fit {module_class.__name__} as built from its hyper-parameters: {shown}"
            ) from None
        raise
