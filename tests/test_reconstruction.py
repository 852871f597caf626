"""Least-squares reconstruction after a pruning event: the pure function, the pruner, the callback."""

import copy

import pytest
import torch
from torch import nn

from pqv_lightning import StructuredPruning
from pqv_lightning.errors import ConfigError
from pqv_lightning.pruning import PruningConfig, prune_once, reconstruct_linears

from conftest import make_trainer, random_loader, step_pruning, tiny_vit


def _pair(hidden_student=6, seed=0):
    """reference: 5 -> 8 -> 4 outputs; student: the same first layer cut to ``hidden_student`` units
    and a second layer that keeps outputs [0, 2, 3]."""
    torch.manual_seed(seed)
    reference = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
    student = nn.Sequential(nn.Linear(5, hidden_student), nn.ReLU(), nn.Linear(hidden_student, 3))
    with torch.no_grad():
        student[0].weight.copy_(reference[0].weight[:hidden_student])
        student[0].bias.copy_(reference[0].bias[:hidden_student])
        student[2].weight.copy_(reference[2].weight[[0, 2, 3]][:, :hidden_student])
        student[2].bias.copy_(reference[2].bias[[0, 2, 3]])
    return student, reference, torch.tensor([0, 2, 3])


def test_the_refit_is_the_least_squares_solution_computed_by_hand():
    student, reference, keep = _pair()
    inputs = [torch.randn(7, 5), torch.randn(9, 5)]
    x = torch.cat(inputs)
    with torch.no_grad():
        features = torch.cat([torch.relu(student[0](x)), torch.ones(len(x), 1)], dim=1).double()
        target = reference(x)[:, keep].double()
        before = (
            features @ torch.cat([student[2].weight.T, student[2].bias[None]]).double() - target
        ).norm() / target.norm()
        solution = torch.linalg.lstsq(features, target).solution

    fits = reconstruct_linears(student, reference, ["2"], inputs, {"2": keep}, ridge=0.0)
    assert len(fits) == 1 and fits[0].applied
    torch.testing.assert_close(student[2].weight.double(), solution[:-1].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student[2].bias.double(), solution[-1], rtol=1e-4, atol=1e-5)
    assert fits[0].before == pytest.approx(float(before), rel=1e-4)
    with torch.no_grad():
        after = (student(x)[:, :].double() - target).norm() / target.norm()
    assert fits[0].after == pytest.approx(float(after), rel=1e-3, abs=1e-6) and fits[0].after < fits[0].before


def test_a_fit_that_is_not_better_leaves_the_weights_alone():
    student, reference, _ = _pair(hidden_student=8)
    with torch.no_grad():  # the student already computes the reference's outputs 0..3 exactly
        student[2] = copy.deepcopy(reference[2])
    weight = student[2].weight.detach().clone()
    fits = reconstruct_linears(student, reference, ["2"], [torch.randn(16, 5)], ridge=0.5)
    assert not fits[0].applied and fits[0].after == fits[0].before
    assert torch.equal(student[2].weight, weight)


def _all_reduce_mean(recorded: dict[str, list[torch.Tensor]], calls):
    """The mean of what ranks "a" and "b" recorded, call by call: what the all-reduce hands every rank."""

    def reduce_mean(_t: torch.Tensor) -> torch.Tensor:
        i = next(calls)
        return (recorded["a"][i] + recorded["b"][i]) / 2

    return reduce_mean


def test_averaged_sums_give_every_rank_the_single_process_weights():
    a, b = torch.randn(8, 5), torch.randn(12, 5)
    single, reference, keep = _pair()
    reconstruct_linears(single, reference, ["2"], [a, b], {"2": keep})

    recorded: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for rank, data in (("a", a), ("b", b)):  # what each rank would contribute to the all-reduce
        student, _, _ = _pair()
        reconstruct_linears(
            student,
            reference,
            ["2"],
            [data],
            {"2": keep},
            reduce_mean=lambda t, r=rank: recorded[r].append(t.clone()) or t,
        )
    for data in (a, b):
        student, _, _ = _pair()
        reconstruct_linears(
            student, reference, ["2"], [data], {"2": keep}, reduce_mean=_all_reduce_mean(recorded, iter(range(3)))
        )
        torch.testing.assert_close(student[2].weight, single[2].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(student[2].bias, single[2].bias, rtol=1e-5, atol=1e-6)


def test_bad_reconstruction_input_is_refused():
    student, reference, keep = _pair()
    with pytest.raises(ConfigError, match="ridge=-1.0 must be"):
        reconstruct_linears(student, reference, ["2"], [torch.randn(4, 5)], ridge=-1.0)
    with pytest.raises(ConfigError, match="at least one batch"):
        reconstruct_linears(student, reference, ["2"], [])
    with pytest.raises(ConfigError, match="'2': the pruned layer has 3 outputs but 4 kept outputs"):
        reconstruct_linears(student, reference, ["2"], [torch.randn(4, 5)])
    with pytest.raises(ConfigError, match="refits nn.Linear layers; '1' is a ReLU"):
        reconstruct_linears(student, reference, ["1"], [torch.randn(4, 5)])
    with pytest.raises(ConfigError, match="reconstruct_ridge=nan"):
        PruningConfig(reconstruct_ridge=float("nan")).validate()
    with pytest.raises(
        ConfigError, match=r"reconstruct_layers='writers' is not supported; allowed: \['all', 'residual'\]"
    ):
        PruningConfig(reconstruct=True, reconstruct_layers="writers").validate()
    with pytest.raises(ConfigError, match="reconstruct_layers='qkv' is not supported"):
        StructuredPruning(reconstruct=True, reconstruct_layers="qkv")  # the callback refuses it before training
    with pytest.raises(ConfigError, match="reconstruct_samples=0"):
        StructuredPruning(reconstruct=True, reconstruct_samples=0)


def test_pruning_with_reconstruction_keeps_the_network_closer_to_the_original():
    torch.manual_seed(0)
    original = tiny_vit(embed_dim=96, num_heads=6).eval()
    calibration = [torch.randn(32, 1, 32, 32) for _ in range(4)]
    held_out = torch.randn(64, 1, 32, 32)
    plain, rebuilt, residual = copy.deepcopy(original), copy.deepcopy(original), copy.deepcopy(original)
    prune_once(plain, PruningConfig(importance="l2", pruning_ratio=0.25))
    event = prune_once(
        rebuilt, PruningConfig(importance="l2", pruning_ratio=0.25, reconstruct=True), calibration=calibration
    )
    event_residual = prune_once(
        residual,
        PruningConfig(importance="l2", pruning_ratio=0.25, reconstruct=True, reconstruct_layers="residual"),
        calibration=calibration,
    )
    for e in (event, event_residual):
        assert e.reconstruction_error_after < 0.5 * e.reconstruction_error_before
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    with torch.no_grad():
        target = original(held_out)
        err_plain, err_rebuilt, err_residual = (
            (m.eval()(held_out) - target).norm() / target.norm() for m in (plain, rebuilt, residual)
        )
    # on inputs the fit never saw; refitting every Linear beats refitting the residual writers only
    assert err_rebuilt < err_residual < 0.85 * err_plain
    # "residual" left qkv / fc1 / head as pruning cut them
    assert torch.equal(residual.head.weight, plain.head.weight) and not torch.equal(
        rebuilt.head.weight, plain.head.weight
    )
    with pytest.raises(RuntimeError, match="pass calibration input batches"):
        prune_once(copy.deepcopy(original), PruningConfig(importance="l2", reconstruct=True))


def test_the_callback_fits_on_the_windows_inputs_and_leaves_no_hook(tmp_path, lit_model):
    pruning = step_pruning(reconstruct=True, reconstruct_samples=24)
    seen = []
    original = pruning._capture_input
    pruning._capture_input = lambda module, args: (seen.append(len(args[0])), original(module, args))[1]
    trainer = make_trainer(tmp_path, [pruning], max_epochs=1)
    trainer.fit(lit_model, random_loader(128, 16))  # 8 steps of 16 images
    assert [e.index for e in pruning.events] == [1, 2]
    for event in pruning.events:
        assert event.reconstruction_error_after < event.reconstruction_error_before
    assert seen == [16, 16, 16, 16]  # the two windows' batches only (steps 1-2 and 4-5)
    assert pruning._calibration == [] and pruning._capture_handle is None
    assert not lit_model.model._forward_pre_hooks  # nothing left on the network after fit
    assert "pruning/reconstruction_error_after" in pruning.events[0].metrics()


def test_stage_by_stage_fitting_equals_whole_forward_fitting():
    from pqv_lightning.pruning.adapters import find_adapter

    torch.manual_seed(0)
    original = tiny_vit(depth=3).eval()
    pruned = copy.deepcopy(original)
    prune_once(pruned, PruningConfig(importance="l2", pruning_ratio=0.25))
    adapter = find_adapter(pruned)
    assert adapter.residual_writers(pruned) == [f"blocks.{i}.{p}" for i in range(3) for p in ("attn.proj", "mlp.fc2")]
    layers, stages = adapter.reconstruction_layers(pruned), adapter.reconstruction_stages(pruned)
    assert layers == [f"blocks.{i}.{p}" for i in range(3) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")] + [
        "head"
    ]  # the head runs after the stages: fitted with whole forward passes
    assert stages == ["blocks.0", "blocks.1", "blocks.2"]
    keep = {n: torch.arange(pruned.get_submodule(n).out_features) for n in layers}  # any consistent choice will do
    calibration = [torch.randn(8, 1, 32, 32) for _ in range(2)]
    whole, staged = copy.deepcopy(pruned), copy.deepcopy(pruned)
    fits_whole = reconstruct_linears(whole, original, layers, calibration, keep)
    fits_staged = reconstruct_linears(staged, original, layers, calibration, keep, stages=stages)
    assert [f.applied for f in fits_whole] == [f.applied for f in fits_staged] and any(f.applied for f in fits_whole)
    for a, b in zip(fits_whole, fits_staged):
        assert a.before == pytest.approx(b.before, rel=1e-4) and a.after == pytest.approx(b.after, rel=1e-4)
    for (n, p), q in zip(whole.named_parameters(), staged.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    assert all(f.applied for f in fits_staged if f.name == "head")
    with pytest.raises(ConfigError, match="not in the order of the stages"):
        reconstruct_linears(whole, original, ["head", "blocks.0.attn.proj"], calibration, keep, stages=stages)
