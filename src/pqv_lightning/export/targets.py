"""Export targets: one class per file format, in a registry the exporter iterates over.

A target turns the fp32 reference model into a file at a given precision, loads that file back
with the runtime that will execute it on the device, and says how to measure its memory in a
fresh process. Everything around it (verification, latency, manifest, atomic writes) is shared
in :mod:`pqv_lightning.export.core`.

Targets are entries of :data:`TARGETS` (format name -> target). A target applies a precision
config (:mod:`.precisions`) with the handler it registered for that config's class::

    @register_target
    class MyTarget(ExportTarget):
        format, suffix = "my", ".my"
        ...

    @MyTarget.handles(Int8Dynamic)
    def _my_int8_dynamic(model, precision, ...): ...
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from ..widths import WIDTH_RULE_DEFAULTS
from .precisions import Precision

__all__ = [
    "TARGETS",
    "Built",
    "ExportTarget",
    "PrecisionJob",
    "Runner",
    "UnsupportedPrecisionError",
    "chunked",
    "formats_writing",
    "register_target",
]

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Built:
    """What a target reports about the file it wrote."""

    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # the in-Python model the file should reproduce exactly (e.g. the pt2e-quantized graph); its
    # cosine against the file's outputs checks the lowering separately from the quantization error
    quantized_reference: Runner | None = None


class UnsupportedPrecisionError(ConfigError):
    """A target has no handler for a precision config."""


class ExportTarget:
    """Base class. Subclasses set the class attributes, implement :meth:`write` and :meth:`load`,
    and register one handler per precision config class with :meth:`handles`."""

    format: ClassVar[str]
    suffix: ClassVar[str]
    extra: ClassVar[str | None] = None  # pip extra that installs the runtime
    requires: ClassVar[tuple[str, ...]] = ()  # importable modules it needs
    engine_dependent: ClassVar[bool] = False  # one file per torch quantized engine for int8
    #: files written beside the main one with the same stem (OpenVINO's ``.bin`` weights); staged,
    #: renamed, hashed and removed together with it
    companion_suffixes: ClassVar[tuple[str, ...]] = ()
    #: the runtime that executes the file (named in the manifest and in its ``best`` entry)
    runtime: ClassVar[str] = ""
    # python source run in a fresh process to measure inference memory; argv: path, shape "1,3,224,224",
    # threads, engine or "-" (see PROBE_HEAD/PROBE_RESET/PROBE_TAIL); None: memory is not measured
    memory_probe: ClassVar[str | None] = None
    #: precision options this target cannot honour: field name -> why (a precision with the field
    #: set is refused by :meth:`handler`, i.e. by ``MobileExportConfig.validate()`` before any work)
    unsupported_options: ClassVar[dict[str, str]] = {}
    #: the width multiple this runtime's kernels run fastest (``MobileExportConfig(pad_widths="auto")``
    #: pads the model's widths to it, exactly, before :meth:`write`); None: widths do not matter enough
    #: to pay the padding's extra MACs
    width_multiple: ClassVar[int | None] = None
    #: pruning options under which this runtime runs pruned models fastest at equal MACs;
    #: ``StructuredPruning(widths_for=<format>)`` makes them the defaults (OpenVINO: whole heads; the
    #: keys are :data:`pqv_lightning.widths.WIDTH_RULE_DEFAULTS`'s; :func:`~pqv_lightning.widths.width_rule`)
    pruning_defaults: ClassVar[dict[str, Any]] = {}
    _handlers: ClassVar[dict[type[Precision], Callable[..., Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = dict(cls._handlers)  # a subclass starts from its parent's handlers

    @classmethod
    def handles(cls, *config_types: type[Precision]) -> Callable:
        """Decorator: the function applies precision configs of these classes (and their subclasses)
        for this target: ``handler(subject, job: PrecisionJob) -> result`` (:class:`PrecisionJob`)."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            check_handler_signature(fn)
            for config_type in config_types:
                cls._handlers[config_type] = fn
            return fn

        return deco

    def handler(self, precision: Precision) -> Callable[..., Any]:
        """The handler for ``precision`` (closest config class along its MRO).

        Raises:
            UnsupportedPrecisionError: no handler applies.
        """
        for option, reason in self.unsupported_options.items():
            if getattr(precision, option, False):
                raise UnsupportedPrecisionError(
                    f"format {self.format!r} cannot apply precision {precision.name!r} ({option}=True): {reason}"
                )
        for klass in type(precision).__mro__:
            if klass in self._handlers:
                return self._handlers[klass]
        raise UnsupportedPrecisionError(
            f"format {self.format!r} cannot apply precision {precision.name!r} ({type(precision).__name__}); "
            f"it handles {sorted(t.__name__ for t in self._handlers)}"
            + (f" ({precision.runs_on})" if precision.runs_on else "")
        )

    def check_model(self, model: nn.Module, precision: Precision) -> None:
        """Refuse (``ConfigError``) a model this target cannot write at ``precision`` — called by
        ``export_mobile`` for every format x precision before any file is written. Default: accept."""
        return None

    def supports(self, precision: Precision) -> bool:
        try:
            self.handler(precision)
        except UnsupportedPrecisionError:
            return False
        return True

    def missing(self) -> str | None:
        """Why this target cannot run here (a missing package), or None."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if not absent:
            return None
        hint = f"pip install 'pqv-lightning[{self.extra}]'" if self.extra else f"install {absent}"
        return f"format {self.format!r} needs {absent}: {hint}"

    def companions(self, path: str | Path) -> list[Path]:
        """The files that belong to the artifact at ``path`` besides itself."""
        return [Path(path).with_suffix(s) for s in self.companion_suffixes]

    def write(
        self,
        reference: nn.Module,
        precision: Precision,
        engine: str,
        example: torch.Tensor,
        calibration: Sequence[torch.Tensor],
        path: str,
        options: dict[str, Any],
    ) -> Built:
        raise NotImplementedError

    def load(self, path: str, example: torch.Tensor, threads: int) -> Runner:
        raise NotImplementedError

    def start_runtime(self) -> None:
        """Import and start what :meth:`load` uses (the runtime's modules, its process-wide objects), so
        that memory measured from after this call to after inference is the file's own (the round-robin
        timing processes measure it so, like :attr:`memory_probe`). Default: nothing to start."""


#: format name -> :class:`ExportTarget`; what ``formats=[...]`` accepts everywhere.
TARGETS: Registry[ExportTarget] = Registry(
    "export format",
    argument="formats",
    builtins=tuple(
        f"{__package__}.{m}" for m in ("executorch_target", "onnx_target", "torchscript_target", "openvino_target")
    ),
)


def formats_writing(precision: Precision) -> list[str]:
    """The names of the formats in :data:`TARGETS` that can write ``precision``."""
    return [name for name in TARGETS.names() if TARGETS[name].supports(precision)]


def check_handler_signature(fn: Callable[..., Any]) -> None:
    """A precision handler takes ``(subject, job)``: two positional parameters, nothing else required.

    Raises:
        TypeError: another signature (the name of the function and what it takes).
    """
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_rest = [p for p in params[len(positional) :] if p.default is p.empty and p.kind == p.KEYWORD_ONLY]
    if len(positional) != 2 or required_rest:
        taken = ", ".join(p.name for p in params)
        raise TypeError(
            f"precision handler {getattr(fn, '__qualname__', fn)!r} takes ({taken}); a handler takes "
            "(subject, job: PrecisionJob)"
        )


@dataclass
class PrecisionJob:
    """What a precision handler gets besides the thing it converts. Every handler of every target has
    one signature, ``handler(subject, job) -> result``; the subject and the result are the target's own
    (``pte`` / ``ptl``: a module; ``onnx``: the fp32 file's path; ``openvino``: an OpenVINO model)."""

    precision: Precision
    example: torch.Tensor | None = None
    calibration: Sequence[torch.Tensor] = ()
    engine: str | None = None  # torch's quantized engine (``ptl``)
    path: str | None = None  # where the file goes (``onnx``)
    work_dir: str | None = None  # a scratch folder (``onnx``)
    details: dict[str, Any] = field(default_factory=dict)  # what the handler reports for the manifest


def register_target(cls: type[ExportTarget]) -> type[ExportTarget]:
    """Class decorator: make ``cls.format`` available to ``MobileExportConfig(formats=[...])``."""
    unknown = sorted(set(cls.pruning_defaults) - set(WIDTH_RULE_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"export format {cls.format!r}: pruning_defaults may set {sorted(WIDTH_RULE_DEFAULTS)}, not {unknown}"
        )
    TARGETS.register(cls.format, cls())
    return cls


def chunked(run: Runner, batch: int) -> Runner:
    """Run a fixed-batch program on any batch: split into chunks of ``batch`` rows, zero-pad the
    last one, drop the padding from the output."""

    def call(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for start in range(0, len(x), batch):
            part = x[start : start + batch]
            rows = len(part)
            if rows < batch:
                part = torch.cat([part, part.new_zeros((batch - rows, *part.shape[1:]))])
            outs.append(run(part.contiguous())[:rows])
        return torch.cat(outs)

    return call


# the memory probes share this prologue: reset the peak RSS, load, run 3 times, print before/peak
PROBE_HEAD = """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))

x = torch.randn(*[int(d) for d in sys.argv[2].split(",")])
"""
PROBE_RESET = """
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
    fh.write("5")
before = status("VmRSS:")
"""
PROBE_TAIL = """
print(before, status("VmHWM:"))
"""
