"""Layer-wise least-squares reconstruction after a pruning event.

Removing channels changes what every later layer sees. Before fine-tuning has to undo that, the
Linear layers (a ViT block's ``qkv``, ``proj``, ``fc1``, ``fc2``, then the head; or only the
residual writers ``proj`` and ``fc2``) can be refitted in closed form so that, on a few calibration
images, the pruned network reproduces what the network computed before the event: for each such
Linear, in forward order,

    W, b = argmin  || X W + b - Y[:, kept] ||²  +  λ ||W||²

where ``X`` are the layer's inputs in the *pruned* network (earlier layers already refitted) and
``Y`` the layer's outputs in the network *before* the event, restricted to the output channels the
event kept. The ridge ``λ`` is ``ridge`` times the mean diagonal of ``XᵀX``. The sums ``XᵀX``,
``XᵀY`` and ``‖Y‖²`` are accumulated over calibration batches in float64, so the images need not
fit in one batch, and averaged over processes with ``reduce_mean`` (DDP: every rank solves the same
system and gets the same weights). A fit that would not lower the layer's error is not applied.

This is the reconstruction step of post-training structured pruning (e.g. Kwon et al., "A Fast
Post-Training Pruning Framework for Transformers", 2022: mask tuning by linear least squares).
On the bundled Fashion-MNIST ViT (90.9 % test accuracy), one-shot L2 pruning of 25 % / 50 % of the
channels leaves 57.7 % / 23.8 %; refitting every Linear on 256 training images brings it back to
90.5 % / 90.0 % without any training (``benchmarks/reconstruction_probe.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..progress import Progress

__all__ = ["LayerFit", "check_ridge", "reconstruct_linears", "rows_per_input", "samples_needed"]


@dataclass(frozen=True)
class LayerFit:
    """One refitted layer: relative error ``‖XW + b − Y‖ / ‖Y‖`` on the calibration inputs with the
    pruned weights (``before``) and the refitted ones (``after``); ``applied`` is False when the fit
    was not better and the weights were left alone."""

    name: str
    before: float
    after: float
    applied: bool


def check_ridge(value: object, name: str = "ridge") -> None:
    """A ridge is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0")


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the layer of interest has run."""


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    box: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        box["value"] = (args[0] if what == "input" else output).detach()
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "value" not in box:
        raise RuntimeError(f"the layer to reconstruct did not run in the forward pass ({type(layer).__name__})")
    return box["value"]


def _check(name: str, layer: nn.Module, ref_layer: nn.Module, keep: torch.Tensor | None) -> None:
    if not isinstance(layer, nn.Linear) or not isinstance(ref_layer, nn.Linear):
        raise ConfigError(f"reconstruction refits nn.Linear layers; {name!r} is a {type(layer).__name__}")
    expected = ref_layer.out_features if keep is None else len(keep)
    if layer.out_features != expected:
        raise ConfigError(
            f"{name!r}: the pruned layer has {layer.out_features} outputs but {expected} kept outputs "
            f"of the reference were given"
        )


@torch.no_grad()
def rows_per_input(model: nn.Module, example: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, int]:
    """The rows each Linear layer of ``layers`` (default: every Linear of ``model``) sees in one forward
    pass of ``example[:1]`` (one input): one per token for a ViT's blocks, one for its head. Layers the
    pass does not reach are missing."""
    if layers is None:
        layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    rows: dict[str, int] = {}
    hooks = []
    for name in layers:
        layer = model.get_submodule(name)

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            rows[name] = rows.get(name, 0) + args[0].numel() // args[0].shape[-1]

        hooks.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()(example[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


@torch.no_grad()
def samples_needed(model: nn.Module, layers: Sequence[str], example: torch.Tensor) -> tuple[int, str, int]:
    """How many calibration inputs (images) the least-squares fit of ``layers`` needs at least:
    each layer's system ``XᵀX`` is as wide as the layer's input, and is only determined by the data
    (not by the ridge alone) when ``X`` has at least that many rows. One forward pass of
    ``example`` (a batch of one input) counts the rows a single input gives each layer (a ViT's
    ``qkv`` sees one per token, its head one per image). Returns ``(inputs, layer, width)`` of the
    layer that needs the most."""
    rows = rows_per_input(model, example, layers)
    worst = (0, "", 0)
    for name, per_input in rows.items():
        width = _linear(model, name).in_features
        needed = math.ceil(width / max(per_input, 1))
        if needed > worst[0]:
            worst = (needed, name, width)
    return worst


@torch.no_grad()
def reconstruct_linears(
    model: nn.Module,
    reference: nn.Module,
    layers: Sequence[str],
    inputs: Sequence[torch.Tensor],
    keep_out: dict[str, torch.Tensor | None] | None = None,
    *,
    ridge: float = 1e-3,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stages: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[LayerFit]:
    """Refit the Linear ``layers`` of ``model`` (dotted names, in forward order) so that each
    reproduces the matching layer of ``reference`` (the network before pruning) on ``inputs``
    (batches of network inputs). ``keep_out[name]``: indices (into the reference layer's outputs) of
    the outputs the pruned layer kept; ``None`` or missing: all. Both networks run in eval mode; the
    caller's training flags are restored. Returns one :class:`LayerFit` per layer.

    ``stages``: dotted names of modules that run one after the other on one tensor (a ViT's
    ``blocks.0``, ``blocks.1``, ...), each layer inside one of them. Their inputs are then kept
    between stages instead of running both networks from the start for every layer: about
    ``4 x len(stages)`` stage passes instead of ``len(layers)`` (early-stopped) whole forwards.
    """
    check_ridge(ridge)
    if not inputs:
        raise ConfigError("reconstruction needs at least one batch of calibration inputs")
    keep_out = keep_out or {}
    for name in layers:
        _check(name, model.get_submodule(name), reference.get_submodule(name), keep_out.get(name))
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    fits: list[LayerFit] = []

    def fitted(fit: LayerFit) -> None:  # every refit ends here, in order
        fits.append(fit)
        if progress is not None:
            progress(len(fits), len(layers), fit.name)

    try:
        if not stages:
            runs = [(model, x, reference, x) for x in inputs]
            for name in layers:
                fitted(_refit_named(name, model, reference, keep_out, runs, ridge, reduce_mean))
        else:
            _refit_by_stage(model, reference, layers, inputs, keep_out, ridge, reduce_mean, list(stages), fitted)
        return fits
    finally:
        model.train(modes[0])
        reference.train(modes[1])


def _refit_by_stage(
    model: nn.Module,
    reference: nn.Module,
    layers: Sequence[str],
    inputs: Sequence[torch.Tensor],
    keep_out: dict[str, torch.Tensor | None],
    ridge: float,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None,
    stages: list[str],
    fitted: Callable[[LayerFit], None],
) -> None:
    owner = {}  # stage index; len(stages): after the last stage (e.g. the classifier head)
    for name in layers:
        inside = [i for i, stage in enumerate(stages) if name.startswith(stage + ".")]
        owner[name] = inside[0] if inside else len(stages)
    if list(owner.values()) != sorted(owner.values()):
        raise ConfigError(
            f"layers {list(layers)} are not in the order of the stages {stages} (layers in none of them come last)"
        )
    first, ref_first = model.get_submodule(stages[0]), reference.get_submodule(stages[0])
    hidden = [_capture(model, first, x, "input") for x in inputs]
    ref_hidden = [_capture(reference, ref_first, x.to(next(reference.parameters()).device), "input") for x in inputs]
    for i, stage in enumerate(stages):
        block, ref_block = model.get_submodule(stage), reference.get_submodule(stage)
        names = [n for n in layers if owner[n] == i]
        # one pass of the reference stage gives every target of its layers and the next stage's input
        # (the reference never changes; only the pruned model is rerun after each refit)
        targets, ref_next = _reference_pass(reference, ref_block, ref_hidden, names)
        runs = [(block, h, ref_block, r) for h, r in zip(hidden, ref_hidden)]
        for name in names:
            fitted(_refit_named(name, model, reference, keep_out, runs, ridge, reduce_mean, targets.get(name)))
        if i + 1 < len(stages):
            with torch.no_grad():
                hidden = [block(h) for h in hidden]
            ref_hidden = ref_next
    runs = [(model, x, reference, x) for x in inputs]  # after the stages: whole (early-stopped) forwards
    for name in (n for n in layers if owner[n] == len(stages)):
        fitted(_refit_named(name, model, reference, keep_out, runs, ridge, reduce_mean))


@torch.no_grad()
def _reference_pass(
    reference: nn.Module, ref_block: nn.Module, ref_hidden: Sequence[torch.Tensor], names: Sequence[str]
) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """The outputs of the reference layers ``names`` on every batch, from one pass of ``ref_block``
    (a layer that ran other than once per batch gets none: its fit captures its own), and the block's
    outputs (the next stage's inputs)."""
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        reference.get_submodule(n).register_forward_hook(lambda module, args, out, n=n: outputs[n].append(out.detach()))
        for n in names
    ]
    try:
        following = [ref_block(r) for r in ref_hidden]
    finally:
        for handle in handles:
            handle.remove()
    return {n: outs for n, outs in outputs.items() if len(outs) == len(ref_hidden)}, following


def _refit_named(
    name: str,
    model: nn.Module,
    reference: nn.Module,
    keep_out: dict[str, torch.Tensor | None],
    runs: Sequence[tuple[nn.Module, torch.Tensor, nn.Module, torch.Tensor]],
    ridge: float,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None,
    targets: Sequence[torch.Tensor] | None = None,
) -> LayerFit:
    """:func:`_refit` of the layer ``name`` of ``model`` against the same layer of ``reference``."""
    layer, ref_layer = _linear(model, name), _linear(reference, name)
    return _refit(name, layer, ref_layer, keep_out.get(name), runs, ridge, reduce_mean, targets=targets)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    layer = model.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise ConfigError(f"reconstruction refits nn.Linear layers; {name!r} is a {type(layer).__name__}")
    return layer


def _refit(
    name: str,
    layer: nn.Linear,
    ref_layer: nn.Linear,
    keep: torch.Tensor | None,
    runs: Sequence[tuple[nn.Module, torch.Tensor, nn.Module, torch.Tensor]],
    ridge: float,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None,
    targets: Sequence[torch.Tensor] | None = None,
) -> LayerFit:
    """Fit ``layer`` on ``runs``: (module, its input, reference module, its input) pairs whose
    forward passes reach ``layer`` / ``ref_layer``; ``targets``: ``ref_layer``'s outputs on every run,
    when already known (else captured from the reference run)."""
    device = layer.weight.device
    dims = layer.in_features + (1 if layer.bias is not None else 0)
    gram = torch.zeros(dims, dims, dtype=torch.float64, device=device)
    cross = torch.zeros(dims, layer.out_features, dtype=torch.float64, device=device)
    target_sq = torch.zeros((), dtype=torch.float64, device=device)
    for k, (module, batch, ref_module, ref_batch) in enumerate(runs):
        x = _capture(module, layer, batch.to(device), "input").reshape(-1, layer.in_features).float()
        if targets is not None:
            y = targets[k].to(device)
        else:
            y = _capture(ref_module, ref_layer, ref_batch.to(ref_layer.weight.device), "output").to(device)
        y = y.reshape(-1, ref_layer.out_features).float()
        if keep is not None:
            y = y[:, keep.to(device)]
        if layer.bias is not None:
            x = torch.cat([x, torch.ones(len(x), 1, device=device)], dim=1)
        # float32 products (fast on any device), float64 accumulation and solve
        gram += (x.T @ x).double()
        cross += (x.T @ y).double()
        target_sq += y.double().square().sum()
    if reduce_mean is not None:
        gram, cross, target_sq = reduce_mean(gram), reduce_mean(cross), reduce_mean(target_sq)
    current = layer.weight.detach().double().T
    if layer.bias is not None:
        current = torch.cat([current, layer.bias.detach().double()[None]], dim=0)

    def error(w: torch.Tensor) -> float:
        sq = (w * (gram @ w)).sum() - 2 * (w * cross).sum() + target_sq
        return float(sq.clamp_min(0).sqrt() / target_sq.clamp_min(1e-30).sqrt())

    before = error(current)
    system = gram + ridge * gram.diagonal().mean() * torch.eye(dims, dtype=torch.float64, device=device)
    solution = torch.linalg.solve(system.cpu(), cross.cpu()).to(device)
    after = error(solution)
    applied = math.isfinite(after) and after < before
    if applied:
        layer.weight.copy_(solution[: layer.in_features].T.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(solution[-1].to(layer.bias.dtype))
    return LayerFit(name, before, after if applied else before, applied)
