"""Width arithmetic shared by pruning and export (neither imports the other; both import this).

* the head-width rule: with ``round_to`` (the pruner) or a kernel-friendly multiple (export's
  ``pad_widths``), all heads of an attention keep one width, and ``heads x width`` stays a multiple;
* the width rule's options (whole heads or head dims) and their defaults, which an export target's
  ``pruning_defaults`` may change (``StructuredPruning(widths_for=...)`` applies them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["WIDTH_RULE_DEFAULTS", "head_dims_to_remove", "head_width_step", "width_rule"]

#: the width rule's options (attention heads) and their defaults when neither the user nor an export
#: target's preference sets them
WIDTH_RULE_DEFAULTS: dict[str, bool] = {"prune_num_heads": False, "prune_head_dims": True}


def head_width_step(round_to: int, heads: int) -> int:
    """The step in which a head's width may move so that ``heads x width`` stays a multiple of
    ``round_to`` (``round_to`` itself for a group of one)."""
    return round_to // math.gcd(round_to, heads)


def head_dims_to_remove(head_width: int, n_pruned: int, heads: int, round_to: int) -> int:
    """How many dims to remove from each of ``heads`` heads of width ``head_width`` when ``n_pruned``
    are asked for and the total width must stay a multiple of ``round_to``: the kept width is rounded
    down to a multiple of :func:`head_width_step`, and never below one such step."""
    step = head_width_step(round_to, heads)
    kept = (head_width - n_pruned) // step * step
    kept = max(kept, min(step, head_width))
    return max(head_width - kept, 0)


def width_rule(preferred: Mapping[str, bool], **given: bool | None) -> dict[str, bool | None]:
    """The width rule's options: what the user gave (not None), else what ``preferred`` (an export
    target's ``pruning_defaults``) says, else None (the pruning config's own default applies).

    Raises:
        ValueError: ``preferred`` or ``given`` names an option that is not a width-rule option.
    """
    unknown = sorted((set(preferred) | set(given)) - set(WIDTH_RULE_DEFAULTS))
    if unknown:
        raise ValueError(f"width-rule options are {sorted(WIDTH_RULE_DEFAULTS)}, not {unknown}")
    return {name: given[name] if given.get(name) is not None else preferred.get(name) for name in WIDTH_RULE_DEFAULTS}
