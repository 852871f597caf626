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

from torch_pruning import ops
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.dependency import shape_infer as tp_shape_infer

__all__ = ["install"]


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
                    deps[0].index_mapping[0] = tp_index_mapping._SplitIndexMapping(offset=offsets[i:i + 2],
                                                                                   reverse=reverse)


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
