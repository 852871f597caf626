"""A width per coupled group: PruningConfig.group_widths in the pruner, and the allocation that chooses
the widths (pqv_lightning.pruning.allocation) on synthetic costs."""

import pytest
import torch

from pqv_lightning.errors import ConfigError
from pqv_lightning.pruning import PruningConfig, StructuredPruner, restore_structure
from pqv_lightning.pruning.allocation import (
    WidthCostModel,
    allocate_widths,
    group_levels,
    linear_sites,
    removal_costs,
)

from conftest import tiny_vit

EXAMPLE = torch.randn(1, 1, 32, 32)
FC1, ATTN = "blocks.0.mlp.fc1:out", "blocks.1.attn.proj:in"


def _groups(model):
    return StructuredPruner(model, PruningConfig(importance="l2"), example_inputs=EXAMPLE).coupled_groups()


def test_group_widths_are_reached_over_the_events_and_replayed_from_the_state():
    model, fresh = tiny_vit(), tiny_vit()
    names = {g.name: g for g in _groups(tiny_vit())}
    embedding = next(n for n, g in names.items() if g.n_units == 64 and g.heads == 1)
    widths = {FC1: 64, ATTN: 8, embedding: 48}
    pruner = StructuredPruner(
        model, PruningConfig(importance="l2", group_widths=widths, iterative_steps=2), example_inputs=EXAMPLE
    )
    assert pruner.event_widths(1) == {FC1: 160, ATTN: 12, embedding: 56}  # half-way, in whole steps
    pruner.step()
    pruner.step()
    assert model.blocks[0].mlp.fc1.out_features == 64 and model.blocks[1].mlp.fc1.out_features == 256
    assert model.blocks[1].attn.head_dim == 8 and model.blocks[1].attn.qkv.out_features == 3 * 4 * 8
    assert model.blocks[0].attn.head_dim == 16 and model.embed_dim == 48 and model.norm.weight.shape == (48,)
    assert model(EXAMPLE).shape == (1, 10)
    restore_structure(fresh, pruner.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(EXAMPLE), model.eval()(EXAMPLE))


def test_group_widths_remove_the_least_important_units():
    model = tiny_vit()
    with torch.no_grad():  # units 0..9 of block 0's MLP carry nothing: the L2 criterion removes them first
        model.blocks[0].mlp.fc1.weight[:10] = 0
        model.blocks[0].mlp.fc1.bias[:10] = 0
        model.blocks[0].mlp.fc2.weight[:, :10] = 0
        kept_rows = model.blocks[0].mlp.fc1.weight[10:].clone()
    StructuredPruner(model, PruningConfig(importance="l2", group_widths={FC1: 246}), example_inputs=EXAMPLE).step()
    assert torch.equal(model.blocks[0].mlp.fc1.weight, kept_rows)


@pytest.mark.parametrize(
    "config, fragment",
    [
        (dict(group_widths={FC1: 0}), "must be a dict of group name -> units kept"),
        (dict(group_widths=[FC1]), "must be a dict of group name -> units kept"),
        (dict(group_widths={FC1: 64}, pruning_ratio=0.5), r"give it or \{'pruning_ratio': 0\.5\}"),
        (dict(group_widths={FC1: 64}, target_macs=0.5), "target_macs"),
        (dict(group_widths={FC1: 64}, prune_num_heads=True), "prune_num_heads"),
        (dict(group_widths={FC1: 64}, global_pruning=True), "global_pruning"),
    ],
)
def test_bad_group_widths_are_named(config, fragment):
    with pytest.raises(ConfigError, match=fragment):
        PruningConfig(importance="l2", **config).validate()


def test_group_widths_the_model_cannot_take_are_refused_naming_what_it_can():
    with pytest.raises(ConfigError, match=r"'blocks\.9\.mlp\.fc1:out'\], which are not coupled groups.*blocks\.0"):
        StructuredPruner(tiny_vit(), PruningConfig(group_widths={"blocks.9.mlp.fc1:out": 8}), example_inputs=EXAMPLE)
    with pytest.raises(ConfigError, match=r"group_widths\['blocks\.0\.mlp\.fc1:out'\]=300: allowed a width <= 256"):
        StructuredPruner(tiny_vit(), PruningConfig(group_widths={FC1: 300}), example_inputs=EXAMPLE)
    with pytest.raises(ConfigError, match="multiple of 8"):
        StructuredPruner(tiny_vit(), PruningConfig(group_widths={FC1: 100}, round_to=8), example_inputs=EXAMPLE)


def test_linear_sites_name_the_groups_that_set_each_width():
    model = tiny_vit()
    groups = _groups(model)
    sites = {s.name: s for s in linear_sites(model, groups, EXAMPLE)}
    qkv, fc2, head = sites["blocks.1.attn.qkv"], sites["blocks.0.mlp.fc2"], sites["head"]
    assert qkv.tokens == 65 and qkv.out_group == ATTN and qkv.out_per_unit == 3 * 4  # q, k, v of 4 heads
    assert fc2.in_group == FC1 and fc2.in_per_unit == 1 and fc2.out_group == qkv.in_group  # the embedding
    assert head.tokens == 1 and head.out_group is None  # the classes are never pruned
    units = {g.name: g.n_units for g in groups}
    assert qkv.widths({**units, ATTN: 8}, units) == (64, 96)


def test_removal_costs_put_the_weakest_units_first_and_weigh_wide_units_more():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[3] = 0
        model.blocks[0].mlp.fc2.weight[:, 3] = 0
        model.blocks[0].mlp.fc1.bias[3] = 0
    costs = removal_costs(_groups(model))
    assert all(torch.all(c[1:] >= c[:-1]) for c in costs.values())
    assert float(costs[FC1][0]) == 0.0
    embedding = max(costs, key=lambda n: costs[n].numel() == 64 and "proj" not in n)
    # an embedding channel is coupled to every layer: on average it costs more than an MLP unit
    assert costs[embedding].mean() > 4 * costs["blocks.1.mlp.fc1:out"].mean()


def test_the_cost_model_interpolates_its_table_and_calibrates_the_rest():
    model = tiny_vit()
    groups = _groups(model)
    sites = linear_sites(model, groups, EXAMPLE)
    grid = [0.1, 0.4, 0.7, 1.0]

    def macs(t, i, o, fi, fo):
        return 1e-6 * t * (i * fi) * (o * fo)

    tables = {s.shape: (grid, grid, [[macs(*s.shape, a, b) for b in grid] for a in grid]) for s in sites}
    units = {g.name: g.n_units for g in groups}
    cost = WidthCostModel(sites, units, {g.name: g.heads for g in groups}, tables)
    narrower = {**units, FC1: 100, ATTN: 6}
    exact = sum(1e-6 * s.tokens * w_in * w_out for s in sites for w_in, w_out in [s.widths(narrower, units)])
    assert cost.layers(narrower) == pytest.approx(exact)  # bilinear is exact for a product of widths
    cost.calibrate([(units, cost.layers(units) + 2.0), (narrower, cost.layers(narrower) + 1.5)])
    assert cost.predict(units) == pytest.approx(cost.layers(units) + 2.0)
    assert cost.predict(narrower) == pytest.approx(cost.layers(narrower) + 1.5)
    with pytest.raises(ConfigError, match="no cost table for layer shapes"):
        WidthCostModel(sites, units, {g.name: g.heads for g in groups}, {})


def test_the_allocation_narrows_the_cheapest_groups_first_until_the_budget_is_met():
    levels = {"a": [8, 6, 4, 2], "b": [8, 6, 4, 2]}
    # a's units cost 1 each, b's 10 each; both save the same latency per unit
    costs = {"a": torch.ones(8), "b": 10 * torch.ones(8)}

    def predict(kept):
        return float(kept["a"] + kept["b"])

    assert allocate_widths(levels, costs, predict, 12) == {"a": 4, "b": 8}
    assert allocate_widths(levels, costs, predict, 8) == {"a": 2, "b": 6}
    # b saves 10x more latency per unit: now it goes first
    assert allocate_widths(levels, costs, lambda k: float(k["a"] + 20 * k["b"]), 150) == {"a": 8, "b": 6}
    with pytest.raises(ValueError, match="the narrowest widths allowed predict 4, above the target 3"):
        allocate_widths(levels, costs, predict, 3)


def test_group_levels_are_multiples_of_the_width_rule_and_respect_the_floor():
    groups = {g.name: g for g in _groups(tiny_vit())}
    levels = group_levels(groups[FC1], 8, 0.25)
    assert levels[0] == 256 and min(levels) == 64 and all(v % 8 == 0 for v in levels)
    assert levels == sorted(levels, reverse=True) and len(levels) <= 33
    attn = group_levels(groups[ATTN], 8, 0.1)  # 4 heads: a head's width moves in steps of 2
    assert attn[0] == 16 and all(v % 2 == 0 for v in attn) and min(attn) == 2


def test_fisher_costs_are_saliencies_comparable_across_groups_and_need_no_labels():
    from pqv_lightning.pruning.allocation import fisher_diagonal

    model = tiny_vit()
    batches = [torch.randn(16, 1, 32, 32)]
    fisher = fisher_diagonal(model, batches, micro_batch=4)
    assert all(p.grad is None for p in model.parameters()) and model.training  # left as it was
    assert all(torch.all(fisher[id(p)] >= 0) for p in model.parameters())
    assert fisher_diagonal(model, batches, micro_batch=4)[id(model.head.weight)].equal(fisher[id(model.head.weight)])
    groups = _groups(model)
    costs = removal_costs(groups, fisher)
    assert all(torch.all(c[1:] >= c[:-1]) and c.numel() == g.n_units for g, c in zip(groups, costs.values()))
    # by hand for one unit: 1/2 sum F w^2 over the fc1 row, its bias and the fc2 column
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    unit = 0.5 * sum(
        float((fisher[id(p)] * p.detach().square())[index].sum())
        for p, index in ((fc1.weight, (5,)), (fc1.bias, (5,)), (fc2.weight, (slice(None), 5)))
    )
    assert any(abs(float(c) - unit) < 1e-6 * max(1.0, unit) for c in costs[FC1])


def test_a_resumed_pruner_keeps_the_widths_of_the_run_it_resumes():
    first, resumed = tiny_vit(), tiny_vit()
    config = PruningConfig(importance="l2", group_widths={FC1: 64}, iterative_steps=2)
    pruner = StructuredPruner(first, config, example_inputs=EXAMPLE)
    pruner.step()
    other = PruningConfig(importance="l2", group_widths={FC1: 128}, iterative_steps=2)  # e.g. a new search
    again = StructuredPruner(resumed, other, example_inputs=EXAMPLE)
    again.load_state_dict(pruner.state_dict())
    assert again.group_widths == {FC1: 64} and resumed.blocks[0].mlp.fc1.out_features == 160
    again.step()
    assert resumed.blocks[0].mlp.fc1.out_features == 64
