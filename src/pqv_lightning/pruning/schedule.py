"""When a training loop's pruning events run: :class:`EventSchedule`, one small typed value with its
checks and the one formula of the windows (``StructuredPruning`` reads it; nothing restates it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_choice, check_int
from ..errors import ConfigError

__all__ = ["INTERVALS", "EventSchedule"]

#: the units of ``start`` / ``frequency``
INTERVALS = ("epoch", "step")


@dataclass(frozen=True)
class EventSchedule:
    """Before event ``k`` (0-based) a statistics window opens at epoch ``start + k * frequency``
    (``interval="epoch"``) or after optimizer step ``start + k * frequency`` (``interval="step"``);
    the event runs right after the window's ``accumulate_batches``-th optimizer step.

    Args:
        accumulate_batches: optimizer steps of gradient statistics gathered before each event, >= 1.
        interval: ``"epoch"`` or ``"step"``: the unit of ``start`` and ``frequency``.
        start: epoch / optimizer step at which the first window opens, >= 0.
        frequency: epochs / optimizer steps between consecutive windows, >= 1 (with
            ``interval="step"``: >= ``accumulate_batches``, windows never overlap).
    """

    accumulate_batches: int = 8
    interval: str = "epoch"
    start: int = 0
    frequency: int = 1

    def validate(self) -> None:
        check_int("accumulate_batches", self.accumulate_batches, 1)
        check_choice("interval", self.interval, INTERVALS)
        check_int("start", self.start, 0)
        check_int("frequency", self.frequency, 1)
        if self.interval == "step" and self.frequency < self.accumulate_batches:
            raise ConfigError(
                f"frequency={self.frequency} steps is shorter than accumulate_batches={self.accumulate_batches}: "
                "statistics windows would overlap; allowed: frequency >= accumulate_batches"
            )

    def window_opens(self, event: int) -> int:
        """The epoch (``interval="epoch"``) or optimizer step at which the window of event ``event``
        (0-based) opens."""
        return self.start + event * self.frequency

    def last_step(self, events: int, steps_per_epoch: int = 1) -> int:
        """The optimizer step after which the last of ``events`` events runs (``steps_per_epoch``
        converts epochs to steps with ``interval="epoch"``)."""
        per_unit = steps_per_epoch if self.interval == "epoch" else 1
        return self.window_opens(events - 1) * per_unit + self.accumulate_batches

    def describe(self, events: int) -> str:
        """The schedule's values, for error messages."""
        return (
            f"start={self.start}, frequency={self.frequency}, iterative_steps={events}, "
            f"accumulate_batches={self.accumulate_batches}, interval={self.interval!r}"
        )
