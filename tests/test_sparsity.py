"""Group-sparsity regularization and threshold pruning (pqv_lightning.pruning.sparsity + pruner + callback)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from pqv_lightning import StructuredPruning
from pqv_lightning.errors import ConfigError
from pqv_lightning.pruning import PruningConfig, StructuredPruner
from pqv_lightning.pruning.sparsity import (
    GroupSparsity,
    add_sparsity_gradient,
    coupled_groups,
    sparsity_penalty,
    unit_norms,
    unit_weights,
)

from conftest import make_trainer, random_loader, tiny_vit


def _pruner(model, **kw):
    kw.setdefault("importance", "l2")
    kw.setdefault("pruning_ratio", 0.25)
    return StructuredPruner(model, PruningConfig(**kw))


def _group(groups, name):
    return next(g for g in groups if g.name == name)


def _names(model, group):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {(by_id[id(s.param)], s.dim) for s in group.slices}


def test_groups_hold_every_coupled_weight_including_layernorm_tokens_and_head_dims():
    model = tiny_vit(depth=1, embed_dim=16, num_heads=2, mlp_ratio=2.0)
    groups = coupled_groups(_pruner(model))
    assert {g.name for g in groups} == {"blocks.0.mlp.fc2:out", "blocks.0.mlp.fc1:out", "blocks.0.attn.proj:in"}
    mlp = _group(groups, "blocks.0.mlp.fc1:out")
    assert (mlp.n_units, mlp.heads) == (32, 1)
    assert _names(model, mlp) == {
        ("blocks.0.mlp.fc1.weight", 0),
        ("blocks.0.mlp.fc1.bias", 0),
        ("blocks.0.mlp.fc2.weight", 1),
    }
    attn = _group(groups, "blocks.0.attn.proj:in")
    assert (attn.n_units, attn.heads) == (8, 2)  # head_dim 8 offsets, each taken in both heads
    assert _names(model, attn) == {
        ("blocks.0.attn.proj.weight", 1),
        ("blocks.0.attn.qkv.weight", 0),
        ("blocks.0.attn.qkv.bias", 0),
    }
    embed = _group(groups, "blocks.0.mlp.fc2:out")
    names = _names(model, embed)
    for expected in [
        ("blocks.0.norm1.weight", 0),
        ("blocks.0.norm1.bias", 0),
        ("norm.weight", 0),
        ("norm.bias", 0),
        ("cls_token", 2),
        ("pos_embed", 2),
        ("patch_embed.proj.weight", 0),
        ("head.weight", 1),
        ("blocks.0.attn.qkv.weight", 1),
        ("blocks.0.attn.proj.bias", 0),
    ]:
        assert expected in names
    # attention unit u is q, k and v row u of every head: qkv rows u, u+8, 16+u, 24+u, 32+u, 40+u
    qkv = next(s for s in attn.slices if s.param is model.blocks[0].attn.qkv.weight)
    assert sorted(qkv.idxs[qkv.units == 3].tolist()) == [3, 11, 19, 27, 35, 43]


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_penalty_and_gradient_equal_a_hand_computed_reference_on_the_mlp_group(norm):
    model = tiny_vit(depth=1, embed_dim=8, num_heads=2, mlp_ratio=0.5)  # 4 MLP units
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    group = _group(coupled_groups(_pruner(model)), "blocks.0.mlp.fc1:out")
    reg = GroupSparsity(norm, strength=0.3, alpha=4.0)
    w1, b1, w2 = fc1.weight.detach(), fc1.bias.detach(), fc2.weight.detach()
    l2 = [math.sqrt(float((w1[u] ** 2).sum() + b1[u] ** 2 + (w2[:, u] ** 2).sum())) for u in range(4)]
    l1 = [float(w1[u].abs().sum() + b1[u].abs() + w2[:, u].abs().sum()) for u in range(4)]
    lo, hi = min(l2), max(l2)
    gamma = [4.0 ** ((hi - n) / (hi - lo)) for n in l2]
    ref_value = 0.3 * sum(g * (n if norm == "l2" else m) for g, n, m in zip(gamma, l2, l1))

    assert float(sparsity_penalty([group], reg).detach()) == pytest.approx(ref_value, rel=1e-5)
    model.zero_grad(set_to_none=True)
    assert add_sparsity_gradient([group], reg) == pytest.approx(ref_value, rel=1e-5)
    for u in range(4):
        coef = 0.3 * gamma[u] / (l2[u] if norm == "l2" else 1.0)
        f = (lambda t: t) if norm == "l2" else torch.sign
        torch.testing.assert_close(fc1.weight.grad[u], coef * f(w1[u]))
        torch.testing.assert_close(fc1.bias.grad[u], coef * f(b1[u]))
        torch.testing.assert_close(fc2.weight.grad[:, u], coef * f(w2[:, u]))
    assert model.blocks[0].attn.qkv.weight.grad is None  # not in this group


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_gradient_over_all_groups_equals_autograd_and_adds_to_existing_gradients(norm):
    model = tiny_vit(depth=2)
    groups = coupled_groups(_pruner(model))
    reg = GroupSparsity(norm, strength=1e-2, alpha=3.0)
    model.zero_grad(set_to_none=True)
    sparsity_penalty(groups, reg).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    task = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = task[n].clone()
    add_sparsity_gradient(groups, reg)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, task[n] + reference.get(n, 0), rtol=1e-5, atol=1e-6, msg=n)
    assert "blocks.1.norm2.weight" in reference and "cls_token" in reference  # LayerNorm and tokens are penalised
    assert "head.bias" not in reference  # the classifier's outputs are never pruned


def test_unit_weights_range_and_zero_units_get_no_push():
    w = unit_weights(torch.tensor([1.0, 3.0, 2.0]), alpha=4.0)
    torch.testing.assert_close(w, torch.tensor([4.0, 1.0, 2.0]))
    torch.testing.assert_close(unit_weights(torch.tensor([2.0, 2.0]), 4.0), torch.ones(2))
    model = tiny_vit(depth=1, embed_dim=8, num_heads=2, mlp_ratio=0.5)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[1] = 0
        model.blocks[0].mlp.fc1.bias[1] = 0
        model.blocks[0].mlp.fc2.weight[:, 1] = 0
    group = _group(coupled_groups(_pruner(model)), "blocks.0.mlp.fc1:out")
    assert float(unit_norms(group).detach()[1]) == 0
    model.zero_grad(set_to_none=True)
    add_sparsity_gradient([group], GroupSparsity("l2", 1.0))
    assert torch.isfinite(model.blocks[0].mlp.fc1.weight.grad).all()
    assert float(model.blocks[0].mlp.fc1.weight.grad[1].abs().sum()) == 0


def test_regularized_training_drives_weak_units_towards_zero():
    torch.manual_seed(0)
    norms = {}
    for strength in (0.0, 0.05):
        model = tiny_vit(depth=1)
        pruner = _pruner(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in random_loader(n=64, batch_size=16):
            for _ in range(5):
                F.cross_entropy(model(x), y).backward()
                pruner.regularize(GroupSparsity("l2", strength))
                opt.step()
                opt.zero_grad()
        norms[strength] = unit_norms(_group(pruner.coupled_groups(), "blocks.0.mlp.fc1:out")).sort().values
    weakest = slice(0, 32)
    assert float(norms[0.05][weakest].mean()) < 0.5 * float(norms[0.0][weakest].mean())


def _zero_units(model, attention=True):
    """Zero MLP units 3 and 5 of block 0 (every coupled weight) and attention offset 2 of block 1."""
    with torch.no_grad():
        mlp = model.blocks[0].mlp
        for u in (3, 5):
            mlp.fc1.weight[u] = 0
            mlp.fc1.bias[u] = 0
            mlp.fc2.weight[:, u] = 0
        if not attention:
            return
        attn = model.blocks[1].attn
        hd, heads = attn.head_dim, attn.num_heads
        rows = [part * heads * hd + h * hd + 2 for part in range(3) for h in range(heads)]
        attn.qkv.weight[rows] = 0
        attn.qkv.bias[rows] = 0
        attn.proj.weight[:, [h * hd + 2 for h in range(heads)]] = 0


def test_threshold_mode_removes_exactly_the_units_below_the_threshold():
    model = tiny_vit(depth=2)
    _zero_units(model)
    pruner = _pruner(model, pruning_ratio=0.0, threshold=0.05)
    event = pruner.step()
    assert model.blocks[0].mlp.fc1.out_features == 256 - 2
    assert model.blocks[1].mlp.fc1.out_features == 256
    assert model.blocks[1].attn.head_dim == 16 - 1 and model.blocks[0].attn.head_dim == 16
    assert model.embed_dim == 64 and model.blocks[0].norm1.weight.shape == (64,)
    assert (event.removed_by_ratio, event.removed_by_threshold) == (0, 2 + 4)  # 2 MLP units + 1 offset x 4 heads
    state = pruner.state_dict()
    fresh = tiny_vit(depth=2)
    from pqv_lightning.pruning import restore_structure

    restore_structure(fresh, state)
    fresh.load_state_dict(model.state_dict())  # the threshold removals are in the replayable history


def test_threshold_removal_of_zero_mlp_units_keeps_the_function():
    model = tiny_vit(depth=2).eval()
    _zero_units(model, attention=False)
    x = torch.randn(4, 1, 32, 32)
    before = model(x)
    event = _pruner(model, pruning_ratio=0.0, threshold=0.05).step()
    assert event.removed_by_threshold == 2
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_threshold_mode_beside_the_ratio_reports_both_counts():
    model = tiny_vit(depth=2)
    _zero_units(model)
    pruner = _pruner(model, pruning_ratio=0.25, threshold=0.05)
    event = pruner.step()
    # the ratio rule removes the zero units first (l2 scores 0), then nothing is left below the threshold
    assert event.removed_by_ratio > 0
    assert event.removed_by_threshold == 0
    assert model.blocks[0].mlp.fc1.out_features == 192


def test_threshold_keeps_round_to_multiples():
    model = tiny_vit(depth=2)
    _zero_units(model)
    pruner = _pruner(model, pruning_ratio=0.0, threshold=0.05, round_to=8)
    event = pruner.step()
    assert model.blocks[0].mlp.fc1.out_features % 8 == 0 and model.blocks[0].mlp.fc1.out_features == 256
    assert event.removed_by_threshold == 0


def test_threshold_rounds_head_dims_so_the_total_attention_width_is_a_multiple_of_round_to():
    model = tiny_vit(depth=2, embed_dim=96, num_heads=6)  # head dim 16
    attn = model.blocks[1].attn
    hd, heads = attn.head_dim, attn.num_heads
    with torch.no_grad():
        for offset in (1, 3, 5, 7, 9):  # 5 offsets of every head below the threshold
            rows = [part * heads * hd + h * hd + offset for part in range(3) for h in range(heads)]
            attn.qkv.weight[rows] = 0
            attn.qkv.bias[rows] = 0
            attn.proj.weight[:, [h * hd + offset for h in range(heads)]] = 0
    event = _pruner(model, pruning_ratio=0.0, threshold=0.05, round_to=8).step()
    # 6 x 11 = 66 is not a multiple of 8; the next width down that is: 6 x 12 = 72 (one zero offset stays)
    assert attn.head_dim == 12 and attn.proj.in_features == 72 and attn.qkv.out_features == 216
    assert event.removed_by_threshold == 4 * heads
    assert model.blocks[0].attn.head_dim == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(regularization="l3"), "regularization='l3'"),
        (dict(regularization="l2", reg_strength=-1.0), "reg_strength=-1.0"),
        (dict(regularization="l2", reg_strength_end=-0.1), "reg_strength_end=-0.1"),
        (dict(regularization="l2", reg_alpha=0.5), "reg_alpha=0.5"),
        (dict(reg_strength_end=0.1), "reg_strength_end=0.1 needs regularization"),
        (dict(threshold=0.0), "threshold=0.0"),
        (dict(threshold=1.5), "threshold=1.5"),
    ],
)
def test_bad_regularization_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        StructuredPruning(**kwargs)


class _CaptureGrads(Callback):
    """Records the gradients the optimizer is about to apply, after the pruning callback's hook."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
        )


def test_callback_adds_the_growing_penalty_until_the_last_event(tmp_path, lit_model, monkeypatch):
    calls = []
    original = StructuredPruner.regularize

    def spy(self, reg):
        calls.append(reg.strength)
        return original(self, reg)

    monkeypatch.setattr(StructuredPruner, "regularize", spy)
    cb = StructuredPruning(
        importance="taylor",
        pruning_ratio=0.25,
        iterative_steps=2,
        accumulate_batches=2,
        interval="step",
        start=2,
        frequency=2,
        regularization="l2",
        reg_strength=1e-3,
        reg_strength_end=3e-3,
    )
    make_trainer(tmp_path, [cb], max_steps=10, max_epochs=1).fit(lit_model, random_loader(n=160, batch_size=16))
    assert len(cb.events) == 2
    # the last event runs after optimizer step 6 (start 2 + frequency 2 + window 2): steps 0..5 are regularized
    assert cb._reg_last_step == 6
    assert calls == pytest.approx([1e-3 + 2e-3 * s / 6 for s in range(6)])
    assert cb.reg_at(100).strength == pytest.approx(3e-3)


def test_callback_regularization_gradient_matches_the_pure_function(tmp_path, lit_model):
    cb = StructuredPruning(
        importance="l2",
        pruning_ratio=0.25,
        iterative_steps=1,
        accumulate_batches=1,
        interval="step",
        start=4,
        frequency=1,
        regularization="l1",
        reg_strength=1e-3,
    )
    reference_model = copy.deepcopy(lit_model.model)
    capture = _CaptureGrads()
    make_trainer(tmp_path, [cb, capture], max_steps=5, max_epochs=1).fit(lit_model, random_loader(n=80, batch_size=16))
    x, y = next(iter(random_loader(n=80, batch_size=16)))
    loss = F.cross_entropy(reference_model(x), y, label_smoothing=lit_model.hparams.label_smoothing)
    loss.backward()
    add_sparsity_gradient(coupled_groups(_pruner(reference_model)), GroupSparsity("l1", 1e-3))
    for n, p in reference_model.named_parameters():
        torch.testing.assert_close(capture.grads[0][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_under_a_grad_scaler_the_penalty_is_added_to_the_unscaled_gradients(tmp_path, lit_model):
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Snapshot(Callback):  # placed before and after StructuredPruning
        def __init__(self):
            self.grads, self.models = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads.append(
                {
                    n: p.grad.detach().float().clone()
                    for n, p in pl_module.model.named_parameters()
                    if p.grad is not None
                }
            )
            self.models.append(copy.deepcopy(pl_module.model))

    before, after = Snapshot(), _CaptureGrads()
    cb = StructuredPruning(
        importance="l2",
        pruning_ratio=0.25,
        iterative_steps=1,
        accumulate_batches=1,
        interval="step",
        start=3,
        frequency=1,
        regularization="l2",
        reg_strength=1e-2,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    make_trainer(
        tmp_path, [before, cb, after], max_steps=4, max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)]
    ).fit(lit_model, random_loader(n=64, batch_size=16))
    for step in range(2):
        model = before.models[step]
        model.zero_grad(set_to_none=True)
        add_sparsity_gradient(coupled_groups(_pruner(model)), GroupSparsity("l2", 1e-2))
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(
                    after.grads[step][n] - before.grads[step][n], p.grad, rtol=1e-3, atol=1e-6, msg=n
                )
