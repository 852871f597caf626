"""A fix of Torch-Pruning 1.6.1's dependency graph that must act inside the graph's own index mapping.

Channel chunks of token tensors. ``chunk`` along the channel (last) dim of a ``(B, N, C)`` tensor
couples the parts: SwiGLU fused into one Linear (timm's ``GluMlp``: ``fc1`` gives ``2 x hidden``
outputs, ``x1, x2 = fc1(x).chunk(2, -1)``, ``x1 * act(x2)``, EVA-02 Ti/S) means hidden unit ``i`` is
``fc1`` outputs ``i`` and ``hidden + i`` and ``fc2`` input ``i``. Torch-Pruning 1.6.1 gets this wrong
twice: it switches the index mapping off for *every* split with a 3-D parameter (the class token or
the position embedding) upstream, a guard meant for token concatenation (dim 1) in ViTs, so all
``2 x hidden`` indices reach ``fc2`` (``IndexError: index 170 is out of bounds``); and it never
updates a split's offsets after pruning, so a second event maps indices with the first widths.

:func:`install` wraps ``torch_pruning.dependency.index_mapping.update_index_mapping`` (which
Torch-Pruning calls whenever it builds a graph or a pruning group): equal-size chunks of a 3-D
tensor along its last dim get their index mapping back, with offsets from the current width of
their input. Every other node, and every graph without such a chunk, is left exactly as Torch-Pruning
made it. Installed once, process-wide, when :mod:`pqv_lightning.pruning` is imported.
"""

from __future__ import annotations

import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.dependency import shape_infer as tp_shape_infer

from ..widths import head_dims_to_remove

__all__ = ["FixedBasePruner", "install"]


def _channel_chunk(node) -> bool:
    """An equal-size split (``chunk``) of a ``(B, N, C)`` tensor along C."""
    fn = node.grad_fn
    sizes, dim = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_dim", None)
    if node.type != ops.OPTYPE.SPLIT or sizes is None or not isinstance(dim, int):
        return False
    if not hasattr(fn, "_saved_split_size"):  # split with explicit sizes: pruning would change them unevenly
        return False
    if dim >= 2**63:  # PyTorch saves dim=-1 as 2**64 - 1
        dim -= 2**64
    return len(sizes) == 3 and dim % 3 == 2


def _map_channel_chunks(graph) -> None:
    for node in graph.module2node.values():
        if not _channel_chunk(node) or not node.inputs:
            continue
        width = tp_shape_infer.infer_out_channels_recursively(graph, node.inputs[0], [0])
        parts = len(node.outputs)
        if not width or parts == 0 or width % parts:
            continue
        offsets = [i * width // parts for i in range(parts + 1)]
        node.module.offsets, node.module.split_sizes = offsets, [width // parts] * parts
        node.enable_index_mapping = True
        for i, out_node in enumerate(node.outputs):
            forward = [d for d in node.dependencies if d.target == out_node]
            backward = [d for d in out_node.dependencies if d.target == node]
            for deps, reverse in ((forward, False), (backward, True)):
                if deps:
                    deps[0].index_mapping[0] = tp_index_mapping._SplitIndexMapping(
                        offset=offsets[i : i + 2], reverse=reverse
                    )


def install() -> None:
    """Wrap Torch-Pruning's index-mapping update with :func:`_map_channel_chunks` (idempotent)."""
    original = tp_index_mapping.update_index_mapping
    if getattr(original, "_pqv_channel_chunks", False):
        return

    def update_index_mapping(graph) -> None:
        original(graph)
        _map_channel_chunks(graph)

    update_index_mapping._pqv_channel_chunks = True  # type: ignore[attr-defined]
    tp_index_mapping.update_index_mapping = update_index_mapping


class FixedBasePruner(tp.pruner.BasePruner):
    """Torch-Pruning's pruner with two 1.6.1 bugs fixed.

    * Local head pruning made cumulative: 1.6.1 removes ``ceil(ratio_k * current_heads)`` heads at
      step ``k`` although ``ratio_k`` is a cumulative target, so 6 heads at 50 % go 6 -> 5 -> 3 -> 1.
      Here the ratio handed to that formula is rewritten so that after step ``k`` exactly
      ``max(1, int(initial_heads * (1 - ratio_k)))`` heads remain.
    * ``round_to`` on head dims: 1.6.1 rounds ``total width - per-head count`` (e.g. 96 - 4 = 92 ->
      88 with ``round_to=8``) and then removes the difference from *every* head, so a 6-head,
      head-dim-16 attention pruned 25 % ends at head dim 8 instead of 12 (and 64 -> 32 for DeiT-base
      with ``round_to=32``). Here a head's width is rounded down to the smallest multiple that keeps
      the total width (``heads x head dim``) a multiple of ``round_to``.
    """

    _rounding_groups = 1  # channel groups (heads) of the attention group being pruned, for _round_to

    def _is_atten_group(self, group):  # noqa: D401 - TP override
        is_attn, qkv_layers = super()._is_atten_group(group)
        # 1.6.1 calls this for each group right before it rounds that group's count (_round_to)
        self._rounding_groups = self._get_channel_groups(group) if is_attn else 1
        return is_attn, qkv_layers

    def _round_to(self, n_pruned, current_channels, round_to):  # noqa: D401 - TP override
        groups = self._rounding_groups
        if groups <= 1 or current_channels % groups:
            return super()._round_to(n_pruned, current_channels, round_to)
        return head_dims_to_remove(current_channels // groups, n_pruned, groups, round_to)

    def get_target_head_pruning_ratio(self, module) -> float:  # noqa: D401 - TP override
        cumulative = super().get_target_head_pruning_ratio(module)
        if self.global_pruning or cumulative <= 0:
            return cumulative
        initial, current = self.init_num_heads.get(module), self.num_heads.get(module)
        if not initial or not current:
            return cumulative
        target = max(1, int(initial * (1 - cumulative)))
        remove = current - target
        if remove <= 0:
            return 0.0
        # ceil((remove - 0.5) / current * current) == remove, immune to float round-off
        return (remove - 0.5) / current
