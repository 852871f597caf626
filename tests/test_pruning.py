import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from pqv_lightning import PruningConfig, StructuredPruner, count_macs, count_params, prune_once, restore_structure
from pqv_lightning.errors import ConfigError
from pqv_lightning.pruning.adapters import locate_model

from conftest import tiny_vit


def _train_steps(model, opt, pruner, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        F.cross_entropy(model(x), y).backward()
        pruner.accumulate()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("importance", ["taylor", "hessian", "l1", "l2", "random"])
def test_event_physically_removes_channels_and_model_still_trains(importance):
    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = StructuredPruner(model, PruningConfig(importance=importance, pruning_ratio=0.5, iterative_steps=2))
    before = count_params(model)
    _train_steps(model, opt, pruner)
    event = pruner.step([opt])
    assert event.params_before == before and event.params_after == count_params(model) < before
    assert event.macs_after < event.macs_before
    # embed 64 -> 48, head_dim 16 -> 12, MLP 256 -> 192, classifier keeps its 10 outputs
    assert model.patch_embed.proj.out_channels == 48 and model.pos_embed.shape[-1] == 48
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (4, 12, 48)
    assert attn.scale == pytest.approx(12**-0.5)
    assert model.blocks[0].mlp.fc1.out_features == 192 and model.head.out_features == 10
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    _train_steps(model, opt, pruner)
    event2 = pruner.step([opt])
    assert event2.index == 2 and model.patch_embed.proj.out_channels == 32
    assert event2.ratio_reached == pytest.approx(0.5, abs=0.02)
    with pytest.raises(RuntimeError, match="already run"):
        pruner.step([opt])


def test_fused_and_manual_attention_agree_after_head_dim_pruning():
    model = tiny_vit()
    pruner = StructuredPruner(model, PruningConfig(importance="l2", pruning_ratio=0.25))
    pruner.step()
    model.eval()
    x = torch.randn(3, 1, 32, 32)
    for blk in model.blocks:
        blk.attn.fused_attn = True
    fused = model(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    manual = model(x)
    torch.testing.assert_close(fused, manual, rtol=1e-5, atol=1e-5)


def test_local_head_pruning_is_cumulative_not_compounding():
    """Torch-Pruning 1.6.1 alone would go 6 -> 5 -> 3 -> 1 heads for a 50 % target."""
    model = tiny_vit(embed_dim=96, num_heads=6)
    pruner = StructuredPruner(
        model,
        PruningConfig(
            importance="l2", pruning_ratio=0.5, iterative_steps=3, prune_num_heads=True, prune_head_dims=False
        ),
    )
    heads = []
    for _ in range(3):
        pruner.step()
        heads.append(model.blocks[0].attn.num_heads)
    assert heads == [5, 4, 3]
    assert model.blocks[0].attn.head_dim == 16
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    "widths_for,given,heads,head_dim",
    [
        (None, {}, 4, 12),  # the default: dims inside every head
        ("openvino", {}, 3, 16),  # OpenVINO's faster rule at equal MACs: whole heads
        ("onnx", {}, 4, 12),  # ONNX Runtime has no preference
        ("openvino", {"prune_head_dims": True}, 3, 12),  # what the user sets wins
        ("openvino", {"prune_num_heads": False, "prune_head_dims": True}, 4, 12),
    ],
)
def test_widths_for_makes_the_targets_width_rule_the_default(widths_for, given, heads, head_dim):
    from pqv_lightning.export.targets import TARGETS
    from pqv_lightning.widths import width_rule

    model = tiny_vit()  # 4 heads of 16
    rule = width_rule(TARGETS[widths_for].pruning_defaults if widths_for else {}, **given)
    config = PruningConfig(importance="l2", pruning_ratio=0.25, **rule)
    event = prune_once(model, config)
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (heads, head_dim)
    assert model.blocks[0].mlp.fc1.out_features == 192 and model(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    if given == {}:  # whole heads and head dims remove the same attention width: equal MACs
        assert event.macs_after == prune_once(tiny_vit(), PruningConfig(importance="l2", pruning_ratio=0.25)).macs_after


def test_width_rule_and_the_targets_that_set_it():
    from pqv_lightning.errors import ConfigError
    from pqv_lightning.export import ExportTarget, register_target
    from pqv_lightning.export.targets import TARGETS
    from pqv_lightning.widths import width_rule

    with pytest.raises(ConfigError, match="prune_num_heads='yes' must be True or False"):
        PruningConfig(prune_num_heads="yes").validate()
    assert TARGETS["openvino"].pruning_defaults == {"prune_num_heads": True, "prune_head_dims": False}
    assert width_rule(TARGETS["openvino"].pruning_defaults) == {"prune_num_heads": True, "prune_head_dims": False}
    assert width_rule({}, prune_num_heads=True) == {"prune_num_heads": True, "prune_head_dims": None}
    config = PruningConfig(**width_rule({}))  # unset: the config's defaults
    assert (config.prune_num_heads, config.prune_head_dims) == (False, True)
    with pytest.raises(
        ValueError, match=r"width-rule options are \['prune_head_dims', 'prune_num_heads'\], not \['round_to'\]"
    ):
        width_rule({"round_to": 64})
    # a target may only choose the width rule: refused when it registers

    class RoundsTo(ExportTarget):
        format, suffix = "rounds-to-test", ".rt"
        pruning_defaults = {"round_to": 64}

    with pytest.raises(
        ConfigError,
        match=r"export format 'rounds-to-test': pruning_defaults may set "
        r"\['prune_head_dims', 'prune_num_heads'\], not \['round_to'\]",
    ):
        register_target(RoundsTo)
    assert "rounds-to-test" not in TARGETS


def test_optimizer_holds_new_params_and_adam_state_is_sliced_not_reset():
    model = tiny_vit()
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.05},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    pruner = StructuredPruner(model, PruningConfig(importance="taylor", pruning_ratio=0.25))
    _train_steps(model, opt, pruner, n=3)
    fc1 = model.blocks[1].mlp.fc1
    old_state = {k: v.clone() for k, v in opt.state[fc1.weight].items()}
    pruner.step([opt])
    live = list(model.parameters())
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in live} == {id(p) for p in held} and len(held) == len(live)
    # weight-decay groups are preserved
    assert all(p.ndim > 1 for p in opt.param_groups[0]["params"])
    # recover the kept rows/cols from the history and compare moments
    hist = {(n, out): idx for n, out, idx in pruner.state_dict()["history"]}
    removed_rows = set(hist[("blocks.1.mlp.fc1", True)])
    kept_rows = [i for i in range(256) if i not in removed_rows]
    new_state = opt.state[fc1.weight]
    assert torch.equal(new_state["step"], old_state["step"])  # bias correction continues
    assert new_state["exp_avg"].shape == fc1.weight.shape
    # the embedding (residual) group is rooted at one of the layers writing the residual stream
    emb_root = [
        idx for (n, out), idx in hist.items() if out and n.endswith(("mlp.fc2", "attn.proj", "patch_embed.proj"))
    ]
    assert len(emb_root) == 1
    kept_cols = [i for i in range(64) if i not in set(emb_root[0])]
    expected = old_state["exp_avg"][kept_rows][:, kept_cols]
    torch.testing.assert_close(new_state["exp_avg"], expected)
    _train_steps(model, opt, pruner, n=1)  # and it keeps training the new tensors
    assert opt.state[fc1.weight]["step"] == old_state["step"] + 1


def test_state_round_trip_restores_identical_model():
    model = tiny_vit()
    pruner = StructuredPruner(
        model, PruningConfig(importance="l2", pruning_ratio=0.5, iterative_steps=2, prune_num_heads=True)
    )
    pruner.step()
    pruner.step()
    state = pruner.state_dict()
    import json

    json.dumps(state)  # plain types only
    fresh = restore_structure(tiny_vit(seed=1), state)
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), fresh(x))


def test_resumed_pruner_continues_the_schedule_like_an_uninterrupted_one():
    ref = tiny_vit()
    ref_pruner = StructuredPruner(ref, PruningConfig(importance="l2", pruning_ratio=0.5, iterative_steps=3))
    ref_pruner.step()
    state = ref_pruner.state_dict()
    weights = copy.deepcopy(ref.state_dict())
    ref_pruner.step()
    ref_pruner.step()

    resumed = tiny_vit(seed=3)
    pruner = StructuredPruner(resumed, PruningConfig(importance="l2", pruning_ratio=0.5, iterative_steps=3))
    pruner.load_state_dict(state)
    resumed.load_state_dict(weights)
    assert pruner.completed_events == 1
    pruner.step()
    pruner.step()
    assert {k: v.shape for k, v in resumed.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)


def test_round_to_keeps_widths_multiples():
    model = tiny_vit()
    StructuredPruner(model, PruningConfig(importance="l2", pruning_ratio=0.3, round_to=8)).step()
    assert model.patch_embed.proj.out_channels % 8 == 0
    assert model.blocks[0].mlp.fc1.out_features % 8 == 0
    assert model.blocks[0].attn.attn_dim % 8 == 0


def test_frozen_ignored_layer_stays_frozen_and_untouched():
    model = tiny_vit()
    model.head.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    pruner = StructuredPruner(model, PruningConfig(importance="taylor", pruning_ratio=0.25))
    _train_steps(model, opt, pruner)
    pruner.step([opt])
    assert model.head.out_features == 10
    assert not model.head.weight.requires_grad  # Torch-Pruning would have made it trainable
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head"))


def test_distilled_deit_and_deit3_style_models_prune():
    torch.manual_seed(0)
    distilled = VisionTransformerDistilled(
        img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=4
    )
    p = StructuredPruner(distilled, PruningConfig(importance="l2", pruning_ratio=0.25))
    assert p.ignored_names == ["head", "head_dist"]
    p.step()
    assert distilled.dist_token.shape[-1] == 48 and distilled.head_dist.out_features == 10
    distilled.eval()
    assert distilled(torch.randn(1, 1, 32, 32)).shape == (1, 10)

    deit3 = VisionTransformer(
        img_size=32,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        depth=2,
        num_heads=4,
        init_values=1e-4,
        no_embed_class=True,
        class_token=True,
    )
    StructuredPruner(deit3, PruningConfig(importance="l1", pruning_ratio=0.25)).step()
    assert deit3.blocks[0].ls1.gamma.shape == (48,)
    assert deit3(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_qk_norm_vit_prunes_embedding_and_mlp_and_keeps_its_attention_whole():
    """Torch-Pruning 1.6.1 fails with an IndexError inside importance estimation on a ViT whose q and k
    are normalized per head: the adapter keeps qkv whole (said so in kept_whole), the embedding and the
    MLP are pruned, and whole-head pruning, which would have nothing to remove, is refused by name."""
    model = tiny_vit(qk_norm=True)
    pruner = StructuredPruner(model, PruningConfig(importance="l2", pruning_ratio=0.25))
    assert set(pruner.kept_whole) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    assert "qk_norm=True" in pruner.kept_whole["blocks.0.attn.qkv"]
    pruner.step()
    attn = model.blocks[0].attn
    assert (
        model.pos_embed.shape[-1] == 48 and attn.qkv.in_features == 48 and model.blocks[0].mlp.fc1.out_features == 192
    )
    assert attn.qkv.out_features == 3 * 64 and attn.num_heads == 4 and attn.q_norm.weight.shape == (16,)
    model.eval()
    assert torch.isfinite(model(torch.randn(2, 1, 32, 32))).all()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ConfigError,
        match=r"prune_num_heads=True: whole attention heads of VisionTransformer cannot "
        r"be removed \(q/k normalized per head",
    ):
        StructuredPruner(model, PruningConfig(importance="l2", prune_num_heads=True, prune_head_dims=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused untouched
    # a budget is met by the parts that are pruned
    other = tiny_vit(qk_norm=True)
    full = count_macs(other, torch.randn(1, 1, 32, 32))
    prune_once(other, PruningConfig(importance="l2", target_macs=0.6))
    assert 0.5 * full < count_macs(other, torch.randn(1, 1, 32, 32)) <= 0.6 * full


def test_prune_once_needs_calibration_for_gradient_criteria():
    model = tiny_vit()
    with pytest.raises(ValueError, match="calibrate"):
        prune_once(model, PruningConfig(importance="taylor", pruning_ratio=0.25))

    def calibrate(m):
        F.cross_entropy(m(torch.randn(8, 1, 32, 32)), torch.randint(0, 10, (8,))).backward()

    event = prune_once(
        tiny_vit(), PruningConfig(importance="taylor", pruning_ratio=0.25, iterative_steps=2), calibrate=calibrate
    )
    assert event.index == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pruning_ratio=1.0), r"pruning_ratio=1.0 must be a finite number >= 0 and < 1"),
        (dict(pruning_ratio=-0.1), r"pruning_ratio=-0.1 must be a finite number"),
        (dict(pruning_ratio="half"), r"pruning_ratio='half' must be a finite number"),
        (dict(importance="fisher"), r"importance='fisher' is not registered; allowed: \['taylor'"),
        (dict(iterative_steps=0), r"iterative_steps=0 must be an integer >= 1"),
        (dict(round_to=0), r"round_to=0 must be an integer >= 1"),
        (
            dict(head_pruning_ratio=2.0, prune_num_heads=True),
            r"head_pruning_ratio=2.0 must be a finite number >= 0 and < 1",
        ),
    ],
)
def test_bad_config_is_rejected_with_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruner(tiny_vit(), PruningConfig(**kwargs))


def test_bad_layers_are_rejected():
    with pytest.raises(ValueError, match="cover every prunable layer"):
        StructuredPruner(tiny_vit(), PruningConfig(importance="l2", ignored_layers=["*"]))
    with pytest.raises(ValueError, match="'nonexistent' matches no module"):
        StructuredPruner(tiny_vit(), PruningConfig(importance="l2", ignored_layers=["nonexistent"]))
    frozen = tiny_vit()
    frozen.blocks[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"importance='taylor' needs gradients.*blocks\.0\."):
        StructuredPruner(frozen, PruningConfig(importance="taylor"))
    StructuredPruner(frozen, PruningConfig(importance="l2"))  # magnitude needs no gradients


def test_locate_model_rules():
    import torch.nn as nn

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Module()
            self.net.backbone = tiny_vit()
            self.other = nn.Linear(2, 2)

    w = Wrapper()
    name, model, _ = locate_model(w)
    assert name == "net.backbone" and model is w.net.backbone
    assert locate_model(w, "net.backbone")[1] is w.net.backbone
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        locate_model(w, "net.missing")
    with pytest.raises(
        ValueError,
        match=r"which no pruning adapter knows; supported families: \[.timm.models.vision_transformer.VisionTransformer.*register_adapter",
    ):
        locate_model(w, "other")
    w.second = tiny_vit()
    with pytest.raises(ValueError, match=r"several prunable models found.*\['net.backbone', 'second'\]"):
        locate_model(w)
    with pytest.raises(ValueError, match="no prunable model found"):
        locate_model(nn.Sequential(nn.Linear(2, 2)))


def test_bfloat16_model_prunes_and_keeps_its_dtype():
    model = tiny_vit().to(torch.bfloat16)
    event = StructuredPruner(model, PruningConfig(importance="l2", pruning_ratio=0.25)).step()
    assert event.macs_after < event.macs_before
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model(torch.randn(1, 1, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_global_pruning_ranks_across_layers_and_counts_heads_globally():
    model = tiny_vit(embed_dim=96, num_heads=6)
    pruner = StructuredPruner(
        model,
        PruningConfig(
            importance="l2", pruning_ratio=0.25, global_pruning=True, prune_num_heads=True, head_pruning_ratio=0.5
        ),
    )
    pruner.step()
    widths = [b.mlp.fc1.out_features for b in model.blocks]
    assert widths[0] != widths[1] and all(w < 384 for w in widths)  # one threshold, not 288 per layer
    assert sum(b.attn.num_heads for b in model.blocks) == 6  # 12 heads in total, half removed
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_cubic_ratio_schedule_prunes_most_in_the_first_events():
    from pqv_lightning.pruning import cubic_schedule, linear_schedule

    assert linear_schedule(0.5, 4) == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert cubic_schedule(0.5, 4) == [0.0, 0.2890625, 0.4375, 0.4921875, 0.5]
    model = tiny_vit()
    pruner = StructuredPruner(
        model, PruningConfig(importance="l2", pruning_ratio=0.5, iterative_steps=2, ratio_schedule="cubic")
    )
    first = pruner.step()
    assert first.target_ratio == pytest.approx(0.4375)
    assert model.patch_embed.proj.out_channels == 36  # int(64 * (1 - 0.4375))
    assert pruner.step().target_ratio == pytest.approx(0.5) and model.patch_embed.proj.out_channels == 32
    with pytest.raises(ValueError, match=r"ratio_schedule='exp' is not supported; allowed: \['cubic', 'linear'\]"):
        PruningConfig(ratio_schedule="exp").validate()


@pytest.mark.parametrize("kind, target", [("target_macs", 0.6), ("target_params", 0.5), ("target_params", 60_000)])
def test_ratio_for_budget_lands_within_one_channel_of_the_target(kind, target):
    import copy
    import dataclasses

    from pqv_lightning.pruning import PruningConfig, count_macs, count_params, prune_once, ratio_for_budget

    model, x = tiny_vit(), torch.randn(1, 1, 32, 32)
    measure = (lambda m: count_macs(m, x)) if kind == "target_macs" else count_params
    full = measure(model)
    absolute = target * full if target < 1 else target
    ratio = ratio_for_budget(model, PruningConfig(), example_inputs=x, **{kind: target})
    assert measure(model) == full  # the model itself is untouched

    def pruned(r):
        m = copy.deepcopy(model)
        prune_once(m, dataclasses.replace(PruningConfig(), pruning_ratio=r, importance="l2"), example_inputs=x)
        return measure(m)

    assert pruned(ratio) <= absolute < pruned(ratio - 1 / 64)  # one channel of 64 less would miss it


def test_a_budget_with_reconstruction_derives_its_ratio_without_calibration():
    """The search's trials are structure only: reconstruct=True (which needs calibration batches at a real
    event) once made every budget fail before training with "pass calibration input batches"."""
    from pqv_lightning.pruning import PruningConfig, StructuredPruner, ratio_for_budget

    x = torch.randn(1, 1, 32, 32)
    plain = ratio_for_budget(tiny_vit(), PruningConfig(target_macs=0.5), example_inputs=x)
    refit = PruningConfig(target_macs=0.5, reconstruct=True)
    assert ratio_for_budget(tiny_vit(), refit, example_inputs=x) == plain
    pruner = StructuredPruner(tiny_vit(), PruningConfig(importance="l2", target_macs=0.5, reconstruct=True))
    assert pruner.config.pruning_ratio == plain and pruner.config.reconstruct
    pruner.step(calibration=[torch.randn(64, 1, 32, 32)])
    assert pruner.events[0].reconstruction_error_after is not None


@pytest.mark.slow
def test_ratio_for_budget_rejects_impossible_budgets():
    from pqv_lightning.errors import ConfigError
    from pqv_lightning.pruning import PruningConfig, ratio_for_budget

    model = tiny_vit()
    for kwargs, message in [
        (dict(target_macs=1.5e12), r"target_macs=1500000000000.0 is not below the unpruned model"),
        (dict(target_params=0), r"target_params=0 is out of range"),
        (dict(target_params=100), r"target_params=100 \(100\) cannot be reached"),
        (dict(target_macs=0.5, target_params=0.5), "exactly one of"),
        (dict(), "exactly one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ratio_for_budget(model, PruningConfig(), **kwargs)
    # global allocation: the uniform ratio is the nominal one (the last event settles the real ratio)
    assert ratio_for_budget(model, PruningConfig(global_pruning=True), target_macs=0.5) == ratio_for_budget(
        model, PruningConfig(), target_macs=0.5
    )
    with pytest.raises(ConfigError, match="deterministic criterion"):
        StructuredPruner(model, PruningConfig(importance="random", global_pruning=True, target_macs=0.5))
    with pytest.raises(ConfigError, match="give one budget, not both"):
        StructuredPruner(model, PruningConfig(target_macs=0.5, target_params=0.5))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["target_macs", "target_params"])
def test_global_budget_is_met_at_the_last_event_with_that_events_scores(kind):
    from pqv_lightning.pruning import PruningConfig, count_macs, count_params, ratio_for_budget

    model = tiny_vit(depth=3)
    x = torch.randn(1, 1, 32, 32)

    def measure(m):
        return count_macs(m, x) if kind == "target_macs" else count_params(m)

    full = measure(model)
    config = PruningConfig(importance="l2", global_pruning=True, iterative_steps=2, **{kind: 0.5})
    pruner = StructuredPruner(model, config, example_inputs=x)
    assert pruner.config.pruning_ratio == ratio_for_budget(model, config, example_inputs=x)  # the nominal ratio
    # every event settles its ratio on its share of the reduction (linear schedule, 2 events: half each)
    assert pruner.event_budget(1) == pytest.approx(0.75 * full) and pruner.event_budget(2) == pytest.approx(0.5 * full)
    first = pruner.step()
    assert 0.97 * 0.75 * full < measure(model) <= 0.75 * full
    state = pruner.state_dict()
    assert state["ratios"][1] == pytest.approx(first.target_ratio)  # the settled ratio, kept for a resume
    pruner.step()
    assert 0.97 * 0.5 * full < measure(model) <= 0.5 * full
    resumed = StructuredPruner(tiny_vit(depth=3), config, example_inputs=x)
    resumed.load_state_dict(state)
    assert resumed._tp.per_step_pruning_ratio[1] == pytest.approx(first.target_ratio)
    widths = {n: w[1] for n, w in first.widths.items() if n.endswith("mlp.fc1")}
    assert len(set(pruner.widths()[n][1] for n in widths)) > 1  # global: layers lose different shares


@pytest.mark.parametrize(
    "round_to, ratio, head_dim, embed",
    [
        (8, 0.25, 12, 72),  # 6 x 12 = 72 is a multiple of 8: Torch-Pruning 1.6.1 gave head dim 8
        (8, 0.125, 12, 80),  # 6 x 14 = 84 is not; 6 x 12 = 72 is
        (16, 0.25, 8, 64),  # 6 x 12 = 72 is not a multiple of 16; 6 x 8 = 48 is
        (32, 0.25, 16, 64),  # no smaller multiple of 32 (96 = 6 x 16): the head keeps its width
        (None, 0.125, 14, 84),
    ],
)
def test_round_to_rounds_the_total_attention_width_not_each_head_by_the_total(round_to, ratio, head_dim, embed):
    from pqv_lightning.pruning import PruningConfig, prune_once

    model = tiny_vit(embed_dim=96, num_heads=6)
    prune_once(model, PruningConfig(importance="l2", pruning_ratio=ratio, round_to=round_to))
    for block in model.blocks:
        attn = block.attn
        assert (attn.num_heads, attn.head_dim) == (6, head_dim)
        assert attn.qkv.out_features == 3 * 6 * head_dim and attn.proj.in_features == 6 * head_dim
        if round_to:
            assert attn.proj.in_features % round_to == 0
    assert model.patch_embed.proj.out_channels == embed


def test_head_dims_to_remove():
    from pqv_lightning.widths import head_dims_to_remove

    assert head_dims_to_remove(64, 16, 12, 32) == 16  # DeiT-base 25 %: 12 x 48 = 576 = 18 x 32 (1.6.1: 32)
    assert head_dims_to_remove(64, 6, 12, 8) == 6  # 9.375 %: 12 x 58 = 696 = 87 x 8
    assert head_dims_to_remove(64, 6, 12, 64) == 16  # 58 -> 48: a head width step of 64 / gcd(64, 12) = 16
    assert head_dims_to_remove(16, 16, 6, 8) == 12  # never below one step
    assert head_dims_to_remove(3, 2, 6, 64) == 0  # a head narrower than one step keeps its width


@pytest.mark.parametrize("model_name", ["vit_tiny_patch16_224", "resnet10t", "convnext_atto"])
def test_the_budget_search_costs_a_few_pruning_passes_and_finds_the_smallest_ratio(model_name, monkeypatch):
    import copy

    import timm

    from pqv_lightning.pruning import PruningConfig, count_macs, pruner, ratio_for_budget

    kwargs = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4) if "vit" in model_name else {}
    model = timm.create_model(model_name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, 32, 32)
    passes = []
    real = pruner.prune_once
    monkeypatch.setattr(pruner, "prune_once", lambda m, c, **kw: passes.append(c.pruning_ratio) or real(m, c, **kw))
    ratio = ratio_for_budget(model, PruningConfig(importance="l2", target_macs=0.5), example_inputs=x)
    assert 1 <= len(passes) <= 8, passes  # was a grid and 14 bisection steps: 15 pruned copies
    full = count_macs(model, x)

    def macs_at(r):
        m = copy.deepcopy(model)
        real(m, PruningConfig(importance="l2", pruning_ratio=r), example_inputs=x)
        return count_macs(m, x)

    step = pruner.ratio_resolution(model)  # one channel of the widest layer
    assert macs_at(ratio) <= 0.5 * full < macs_at(ratio - 2 * step)


def test_an_event_says_where_its_time_went():
    model = tiny_vit()
    config = PruningConfig(importance="l2", pruning_ratio=0.25, reconstruct=True)
    event = prune_once(model, config, calibration=[torch.randn(8, 1, 32, 32)])
    phases = event.phase_seconds
    assert set(phases) == {"reference", "score_and_remove", "optimizer", "reconstruction", "measure"}
    assert all(v >= 0 for v in phases.values())
    # the phases inside the structural change add up to at most its wall time (measure runs after it)
    assert sum(v for k, v in phases.items() if k != "measure") <= event.seconds + 1e-3
    assert {f"pruning/seconds_{k}" for k in phases} <= set(event.metrics())
    assert event.timing().startswith(f"{event.seconds:.2f} s: ")
    plain = prune_once(tiny_vit(), PruningConfig(importance="l2", pruning_ratio=0.25, threshold=0.05))
    assert "reconstruction" not in plain.phase_seconds and "threshold" in plain.phase_seconds
