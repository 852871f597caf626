"""Up-front checks of user-chosen values, shared by every public entry point.

Each check raises :class:`~pqv_lightning.errors.ConfigError` (or
:class:`~pqv_lightning.errors.InputNotFoundError`) whose message names the argument, the value and
what is allowed, and returns the checked value. They run before any training step or export work,
so a bad value costs nothing. Torch is imported only by :func:`check_forward` and
:func:`check_example_tensor` (this module stays cheap to import for the command line).

Example::

    from pqv_lightning.checks import check_number

    check_number("tau", 2.0, minimum=0, min_open=True)          # 2.0
    check_number("tau", float("nan"), minimum=0, min_open=True)  # ConfigError: tau=nan must be a finite number > 0
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputNotFoundError

__all__ = [
    "check_bool",
    "check_choice",
    "check_example_tensor",
    "check_file",
    "check_forward",
    "check_int",
    "check_mapping",
    "check_names",
    "check_number",
    "check_shape",
    "check_writable_dir",
    "first_line",
]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of ``exc``, at most ``limit`` characters."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _bound(op: str, value: float) -> str:
    return f"{op} {value:g}"


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """A real, finite number (not a bool) within the bounds (``min_open`` / ``max_open``: the bound
    itself is excluded). Returns it as a float."""
    bounds = [
        b
        for b in (
            _bound(">" if min_open else ">=", minimum) if minimum is not None else None,
            _bound("<" if max_open else "<=", maximum) if maximum is not None else None,
        )
        if b
    ]
    allowed = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if min_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_open else value <= maximum
    if not ok:
        raise ConfigError(f"{name}={value!r} must be {allowed}")
    return float(value)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool, not a float) within ``[minimum, maximum]``."""
    bounds = [
        b
        for b in (f">= {minimum}" if minimum is not None else None, f"<= {maximum}" if maximum is not None else None)
        if b
    ]
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        raise ConfigError(f"{name}={value!r} must be an integer" + (" " + " and ".join(bounds) if bounds else ""))
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be True or False")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """One of ``choices``."""
    try:
        ok = value in choices
    except TypeError:  # an unhashable value against a set
        ok = False
    if not ok:
        raise ConfigError(f"{name}={value!r} is not supported; allowed: {list(choices)}")
    return value


def check_names(
    name: str, value: Any, allowed: Collection[str] | Callable[[], Collection[str]], *, empty_ok: bool = False
) -> list[str]:
    """A list (or tuple) of names, each in ``allowed`` (a collection, or a function returning one, read
    only when needed), without repeats; a bare string is refused rather than read letter by letter."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        example = [value] if isinstance(value, str) else ["..."]
        raise ConfigError(f"{name}={value!r} must be a list of names, e.g. {example!r}")
    names = list(value)
    if not names and not empty_ok:
        choices = allowed() if callable(allowed) else allowed
        raise ConfigError(f"{name}=[] is empty; allowed: a non-empty list of {sorted(choices)}")
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"{name}={value!r}: {bad} are not names (strings)")
    choices = allowed() if callable(allowed) else allowed
    unknown = [v for v in names if v not in choices]
    if unknown:
        raise ConfigError(f"{name}={value!r}: unknown {unknown}; allowed: {list(choices)}")
    repeated = sorted({v for v in names if names.count(v) > 1})
    if repeated:
        raise ConfigError(f"{name}={value!r} names {repeated} more than once")
    return names


def check_mapping(name: str, value: Any, example: str) -> Any:
    """None or a dict (e.g. ``input_normalization``)."""
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{name}={value!r} must be None or a dict such as {example}")
    return value


def check_shape(name: str, value: Any, lengths: Sequence[int] = (3, 4)) -> tuple[int, ...]:
    """A list / tuple of ``len in lengths`` positive integers (e.g. ``[C, H, W]``)."""
    ok = (
        isinstance(value, (list, tuple))
        and len(value) in lengths
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)
    )
    if not ok:
        what = " or ".join(str(n) for n in lengths)
        raise ConfigError(f"{name}={value!r} must be a list of {what} positive integers, e.g. [3, 224, 224]")
    return tuple(int(d) for d in value)


def check_writable_dir(name: str, path: Any) -> Path:
    """A folder that exists and is writable, or can be created: probed for real (create the missing
    folders and a file, then remove everything this check created), because ``os.access`` says yes to
    root on a read-only file system or below a file. Touches nothing that was there before."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ConfigError(f"{name}={path!r} must be a folder path (a non-empty string)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{name}={str(out)!r} exists and is not a directory")
    missing = [p for p in (out, *out.parents) if not p.exists()]
    first_created = missing[-1] if missing else None  # the outermost folder this check would create
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".pqv-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{name}={str(out)!r} cannot be written: {exc.strerror or exc}") from None
    finally:
        if first_created is not None and first_created.exists():
            shutil.rmtree(first_created, ignore_errors=True)
    return out


def check_file(name: str, path: Any) -> Path:
    """An existing file."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ConfigError(f"{name}={path!r} must be a file path (a non-empty string)")
    if not Path(path).is_file():
        raise InputNotFoundError(f"{name}={str(path)!r}: no such file")
    return Path(path)


def check_forward(name: str, model: Any, example: Any, what: str = "the model") -> Any:
    """Run ``model(example)`` once without gradients (eval mode, put back afterwards) and return the
    output; any failure becomes a :class:`ConfigError` naming ``name`` and the input's shape. A dry run
    before long work: a wrong input shape or channel count fails here, not after training."""
    import torch

    was_training = getattr(model, "training", False)
    try:
        model.eval()
        with torch.no_grad():
            return model(example)
    except Exception as exc:  # noqa: BLE001 - any failure of the dry run is the value's fault
        shape = list(example.shape) if hasattr(example, "shape") else type(example).__name__
        raise ConfigError(f"{name}: {what} cannot run on an input of shape {shape} ({first_line(exc)})") from exc
    finally:
        model.train(was_training)


def check_example_tensor(name: str, value: Any) -> Any:
    """A floating-point tensor with a non-empty batch dimension (a batch of network inputs)."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise ConfigError(
            f"{name} must be a torch.Tensor (a batch of inputs, e.g. torch.randn(1, 3, 224, 224)), "
            f"got {type(value).__name__}"
        )
    if value.dim() < 1 or value.shape[0] < 1 or value.numel() == 0:
        raise ConfigError(f"{name} has shape {list(value.shape)}; allowed: a batch of at least one input")
    if not (value.is_floating_point() or value.dtype in (torch.uint8,)):
        raise ConfigError(f"{name} has dtype {value.dtype}; allowed: a floating-point tensor")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ConfigError(f"{name} contains NaN or infinite values")
    return value
