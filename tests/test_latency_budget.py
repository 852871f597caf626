"""ratio_for_latency: the smallest ratio whose exported file meets a latency budget, found by exporting and
timing trials; here with a synthetic timer (timings belong in benchmarks), and once for real (slow)."""

import pytest
import torch

import pqv_lightning.latency_budget as mod
from pqv_lightning.errors import ConfigError
from pqv_lightning.latency_budget import LatencyBudget, LatencyProbe, ratio_for_latency, widths_for_latency
from pqv_lightning.pruning import PruningConfig, count_macs

from conftest import tiny_vit

EXAMPLE = torch.randn(1, 1, 32, 32)


@pytest.fixture
def mac_timer(monkeypatch):
    """Files written as state dicts and round_robin replaced by a timer whose latency is 0.1 ms + 1 ms per
    100 kB of the file (the real export and timing: the slow test below)."""
    pytest.importorskip("onnxruntime")
    calls = []

    def fake_write(model, example, budget, folder):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "model.pt")
        return folder / "model.pt"

    monkeypatch.setattr(mod, "_write", fake_write)

    def fake_round_robin(candidates, shape, **kw):
        sizes = {c.label: __import__("os").path.getsize(c.path) for c in candidates}
        calls.append(kw)
        ms = {label: 0.1 + size / 1e5 for label, size in sizes.items()}
        return {label: {"median_ms": t, "round_medians_ms": [t], "contention_max": 0.0} for label, t in ms.items()}

    monkeypatch.setattr(mod, "round_robin", fake_round_robin)

    def fake_sequential(files, budget):  # the latency table's layers, by the same rule
        calls.append({"table": len(files)})
        return [0.1 + __import__("os").path.getsize(path) / 1e5 for path, _ in files]

    monkeypatch.setattr(mod, "_time_sequentially", fake_sequential)
    return calls


def test_the_search_lands_on_the_budget_and_keeps_every_trial(mac_timer):
    model = tiny_vit()
    seen = []
    ratio, info = ratio_for_latency(model, LatencyBudget(0.5, threads=1), example_inputs=EXAMPLE, on_trial=seen.append)
    trials = sorted(info["trials"].values(), key=lambda t: t["ratio"])
    assert info["predicted_fraction"] <= 0.5 and info["ratio"] == ratio
    # the smallest ratio that meets it, to within the width step of one channel of the widest layer (1/256)
    above = [t for t in trials if t["fraction"] > 0.5]
    assert above and max(t["ratio"] for t in above) < ratio <= max(t["ratio"] for t in above) + 2 / 64
    assert trials[-1]["ratio"] == 0.9  # the smallest model allowed is measured first
    assert len(seen) == len(trials) <= 1 + LatencyBudget(0.5).max_passes
    assert all(kw["threads"] == 1 and kw["fresh_processes"] is True for kw in mac_timer)
    assert list(model.state_dict()) and model.embed_dim == 64  # the model was not pruned

    # resumed: the trials given are not measured again
    again, _ = ratio_for_latency(model, LatencyBudget(0.5, threads=1), example_inputs=EXAMPLE, trials=info["trials"])
    assert again == ratio and len(mac_timer) == len(trials)


def test_an_absolute_budget_is_a_fraction_of_the_unpruned_file(mac_timer):
    _, info = ratio_for_latency(tiny_vit(), LatencyBudget(0.5), example_inputs=EXAMPLE)
    ms = 0.5 * info["unpruned_ms"]
    ratio, absolute = ratio_for_latency(tiny_vit(), LatencyBudget(ms if ms >= 1 else 1.0), example_inputs=EXAMPLE)
    assert absolute["budget_fraction"] == pytest.approx(max(ms, 1.0) / absolute["unpruned_ms"])
    assert absolute["predicted_ms"] <= max(ms, 1.0)


def test_budgets_that_cannot_be_met_say_what_the_host_measures(mac_timer):
    with pytest.raises(
        ConfigError, match=r"cannot be met: the smallest model allowed \(0\.9 of the channels removed\) measures"
    ):
        ratio_for_latency(tiny_vit(), LatencyBudget(0.01), example_inputs=EXAMPLE)
    with pytest.raises(ConfigError, match=r"is not below the unpruned model, which measures [0-9.]+ ms"):
        ratio_for_latency(tiny_vit(), LatencyBudget(1e6), example_inputs=EXAMPLE)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"target": 0}, "target=0"),
        ({"target": 0.5, "format": "tflite"}, "format='tflite'"),
        ({"target": 0.5, "precision": "int3"}, "precision='int3'"),
        ({"target": 0.5, "format": "onnx", "precision": "int8-dynamic-int4-weight"}, "cannot write precision"),
        ({"target": 0.5, "max_ratio": 1.0}, "max_ratio=1.0"),
        ({"target": 0.5, "rounds": 0}, "rounds=0"),
    ],
)
def test_a_bad_budget_is_named(kwargs, fragment):
    pytest.importorskip("onnxruntime")
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        LatencyBudget(**kwargs).validate()


def test_compress_takes_a_latency_budget_and_refuses_it_beside_another(tmp_path, mac_timer):
    from pqv_lightning.compress import CompressConfig, compress

    from conftest import quick_export_config

    images = torch.randn(128, 1, 32, 32)
    config = CompressConfig(
        pruning=PruningConfig(importance="l2", reconstruct=True),
        export=quick_export_config(tmp_path, formats=["onnx"], precisions=["fp32"]),
        target_latency=LatencyBudget(0.5, threads=1),
    )
    report = compress(tiny_vit(), images, config)
    latency = report["stages"]["latency"]
    assert report["stages"]["prune"]["config"]["pruning_ratio"] == latency["ratio"]
    assert "Latency budget: 0.5 of the unpruned model's latency on onnx fp32" in report["table"]
    assert count_macs(tiny_vit(), EXAMPLE) > report["stages"]["prune"]["macs_after"]
    with pytest.raises(ConfigError, match="give target_latency or"):
        CompressConfig(pruning=PruningConfig(target_macs=0.5), target_latency=LatencyBudget(0.5)).validate()
    with pytest.raises(ConfigError, match="give target_latency or"):
        CompressConfig(max_accuracy_drop=1.0, target_latency=LatencyBudget(0.5)).validate()


def test_structured_pruning_prunes_to_the_ratio_the_latency_budget_measured(tmp_path, lit_model, mac_timer):
    from conftest import make_trainer, random_loader, step_pruning

    callback = step_pruning(importance="l2", pruning_ratio=None, target_latency=0.5, widths_for="onnx")
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(lit_model, random_loader(128, 16))  # 8 steps: events after steps 3 and 6
    search = callback.latency_search
    assert search is not None and search["predicted_fraction"] <= 0.5
    assert callback.pruner.config.pruning_ratio == search["ratio"] == callback.config.pruning_ratio
    assert callback.pruner.ratio_reached() == pytest.approx(search["ratio"], abs=1 / 16)
    assert callback.state_dict()["latency_search"] == search
    assert len(callback.events) == 2 and len(mac_timer) == len(search["trials"])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({}, "give widths_for"),
        ({"widths_for": "onnx", "pruning_ratio": 0.3}, r"give target_latency=0\.5 or \{'pruning_ratio': 0\.3\}"),
        ({"widths_for": "onnx", "target_macs": 0.3}, "not both: each decides the ratio"),
        ({"widths_for": "onnx", "global_pruning": True}, "allowed: global_pruning=False"),
        ({"widths_for": "onnx", "latency_precision": "int8-dynamic-int4-weight"}, "cannot write precision"),
    ],
)
def test_structured_pruning_refuses_a_latency_budget_it_cannot_meet_as_asked(kwargs, fragment):
    pytest.importorskip("onnxruntime")
    from pqv_lightning import StructuredPruning

    with pytest.raises(ConfigError, match=fragment):
        StructuredPruning(target_latency=0.5, **kwargs)


@pytest.mark.slow
def test_a_real_search_times_onnx_files(tmp_path):
    """Real exports and fresh-process timings; only what holds on a busy host is asserted."""
    pytest.importorskip("onnxruntime")
    ratio, info = ratio_for_latency(
        tiny_vit(),
        LatencyBudget(0.9, threads=1, rounds=1, calls=5, max_passes=2, max_contention=None),
        example_inputs=EXAMPLE,
    )
    assert 0 < ratio <= 0.9 and all(t["ms"] > 0 and t["unpruned_ms"] > 0 for t in info["trials"].values())
    assert info["trials"][f"{ratio:.6f}"]["fraction"] <= 0.9


def test_a_probe_measures_only_while_open(mac_timer):
    probe = LatencyProbe(tiny_vit(), LatencyBudget(0.5), example_inputs=EXAMPLE)
    with pytest.raises(RuntimeError, match="in a with block"):
        probe.measure(0.25)
    with probe:
        row = probe.measure(0.25)
    assert row["fraction"] < 1 and probe.measure(0.25) is row  # kept by ratio, no second timing
    assert len(mac_timer) == 1


# ------------------------------------------------------------------ global allocation (a width per group)
def _global(target=0.5, **kw):
    return LatencyBudget(target, threads=1, allocation="global", **kw)


def test_global_allocation_meets_the_budget_with_a_width_per_group_and_caches_its_table(tmp_path, mac_timer):
    from pqv_lightning.pruning import StructuredPruner, prune_once

    model = tiny_vit()
    widths, info = widths_for_latency(model, _global(), example_inputs=EXAMPLE, cache_dir=tmp_path)
    assert info["met"] and info["measured_fraction"] <= 0.5 and info["group_widths"] == widths
    # the latency model (layer table + a calibrated rest) predicts the file it chose within 10 %
    assert info["predicted_ms"] == pytest.approx(info["measured_ms"], rel=0.1)
    assert not info["table"]["cached"] and len(list(tmp_path.glob("onnx-fp32-*.json"))) == 1
    # the widths differ between groups (not one ratio) and the pruner reaches them exactly
    pruned = tiny_vit()
    prune_once(pruned, PruningConfig(importance="l2", group_widths=widths), example_inputs=EXAMPLE)
    reached = {
        g.name: g.n_units for g in StructuredPruner(pruned, PruningConfig(), example_inputs=EXAMPLE).coupled_groups()
    }
    assert all(reached[name] == kept for name, kept in widths.items())
    assert len({kept / 256 if "fc1" in name else kept for name, kept in widths.items()}) > 1
    assert model.embed_dim == 64 and model.blocks[0].mlp.fc1.out_features == 256  # the model given is untouched

    # a second search reads the table from the cache and reuses the trials it is given
    tables = [c for c in mac_timer if "table" in c]
    again, second = widths_for_latency(
        model, _global(), example_inputs=EXAMPLE, cache_dir=tmp_path, trials=info["trials"]
    )
    assert again == widths and second["table"]["cached"]
    assert [c for c in mac_timer if "table" in c] == tables


def test_global_allocation_refuses_a_budget_below_the_narrowest_widths(tmp_path, mac_timer):
    with pytest.raises(ConfigError, match=r"cannot be met: the narrowest widths allowed \(0\.9 of each group's"):
        widths_for_latency(tiny_vit(), _global(0.05), example_inputs=EXAMPLE, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="allocation='evenly'"):
        LatencyBudget(0.5, allocation="evenly").validate()


def test_compress_and_the_callback_prune_to_the_global_allocation(tmp_path, lit_model, mac_timer, monkeypatch):
    from pqv_lightning.compress import CompressConfig, compress

    from conftest import make_trainer, quick_export_config, random_loader, step_pruning

    monkeypatch.setenv("PQV_CACHE_DIR", str(tmp_path / "cache"))
    config = CompressConfig(
        pruning=PruningConfig(importance="l2", reconstruct=True),
        export=quick_export_config(tmp_path / "out", formats=["onnx"], precisions=["fp32"]),
        target_latency=_global(),
    )
    report = compress(tiny_vit(), torch.randn(128, 1, 32, 32), config)
    latency = report["stages"]["latency"]
    assert report["stages"]["prune"]["config"]["group_widths"] == latency["group_widths"]
    assert report["stages"]["prune"]["config"]["pruning_ratio"] is None
    assert list((tmp_path / "cache" / "latency_tables").glob("*.json"))

    callback = step_pruning(
        importance="l2", pruning_ratio=None, target_latency=0.5, widths_for="onnx", latency_allocation="global"
    )
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(lit_model, random_loader(128, 16))
    search = callback.latency_search
    assert search is not None and search["allocation"] == "global"
    assert callback.pruner.config.group_widths == search["group_widths"]
    final = {g.name: g.n_units for g in callback.pruner.coupled_groups()}
    assert all(final[name] == kept for name, kept in search["group_widths"].items())
    from pqv_lightning import StructuredPruning

    with pytest.raises(ConfigError, match="but you asked for prune_num_heads=True; allowed: prune_num_heads=False"):
        StructuredPruning(target_latency=0.5, widths_for="onnx", latency_allocation="global", prune_num_heads=True)
    with pytest.raises(ConfigError, match="widths_for='openvino''s width rule asked for prune_num_heads=True"):
        StructuredPruning(target_latency=0.5, widths_for="openvino", latency_allocation="global")
    with pytest.raises(ConfigError, match="allowed: prune_num_heads=False"):
        CompressConfig(pruning=PruningConfig(prune_num_heads=True), target_latency=_global()).validate()
    with pytest.raises(ConfigError, match="allowed: prune_num_heads=False"):
        widths_for_latency(tiny_vit(), _global(), PruningConfig(prune_num_heads=True), example_inputs=EXAMPLE)


@pytest.mark.slow
def test_a_real_global_allocation_builds_its_table_and_measures_its_file(tmp_path):
    """Real layer table, exports and fresh-process timings on ONNX Runtime; only what holds on a busy host
    is asserted (how close the prediction comes is a benchmark's business: benchmarks/latency_allocation.py)."""
    pytest.importorskip("onnxruntime")
    from pqv_lightning.pruning import StructuredPruner, prune_once

    budget = LatencyBudget(0.8, threads=1, rounds=1, calls=5, max_passes=2, max_contention=None, allocation="global")
    widths, info = widths_for_latency(
        tiny_vit(), budget, example_inputs=EXAMPLE, cache_dir=tmp_path, calibration=[torch.randn(16, 1, 32, 32)]
    )
    assert info["costs"] == "fisher" and not info["table"]["cached"] and info["table"]["seconds"] > 0
    table = next(tmp_path.glob("onnx-fp32-*.json"))
    assert table.stat().st_size > 0 and not list(tmp_path.glob("*.tmp*"))
    assert info["predicted_ms"] > 0 and info["measured_ms"] > 0 and 0 < info["measured_fraction"]
    pruned = tiny_vit()
    prune_once(pruned, PruningConfig(importance="l2", group_widths=widths), example_inputs=EXAMPLE)
    groups = {
        g.name: g.n_units for g in StructuredPruner(pruned, PruningConfig(), example_inputs=EXAMPLE).coupled_groups()
    }
    assert all(groups[name] == kept for name, kept in widths.items()) and pruned(EXAMPLE).shape == (1, 10)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_resumed_fit_takes_the_latency_decision_from_its_checkpoint(tmp_path, mac_timer, monkeypatch, allocation):
    """The budget is measured once, in the first fit; resuming (or validating a checkpoint) under a new
    callback takes the ratio / widths from the checkpoint and measures nothing, and the resumed run ends
    in the uninterrupted run's structure."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pqv_lightning.classifier import ImageClassifier

    from conftest import make_trainer, random_loader, step_pruning

    monkeypatch.setenv("PQV_CACHE_DIR", str(tmp_path / "cache"))

    def run(tag, ckpt_path=None, checkpoints=None):
        import lightning.pytorch as pl

        pl.seed_everything(0, verbose=False)
        model = ImageClassifier("vit_test_tiny", lr=1e-3)
        callback = step_pruning(
            importance="l2", pruning_ratio=None, target_latency=0.5, widths_for="onnx", latency_allocation=allocation
        )
        extra = [checkpoints] if checkpoints else []
        trainer = make_trainer(tmp_path / tag, [callback, *extra], max_epochs=1, enable_checkpointing=bool(extra))
        return model, callback, trainer

    model, first, trainer = run(
        "first", checkpoints=ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    )
    trainer.fit(model, random_loader(128, 16))  # 8 steps: events after steps 3 and 6, a checkpoint at step 4
    measured = len(mac_timer)
    assert measured > 0 and first.latency_search is not None and len(first.events) == 2
    step4 = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"

    resumed_model, resumed, trainer = run("resumed")
    trainer.fit(resumed_model, random_loader(128, 16), ckpt_path=str(step4))
    assert len(mac_timer) == measured  # nothing measured again
    assert resumed.latency_search == first.latency_search
    assert [e.index for e in resumed.pruner.events] == [2]  # the second event ran in the resumed fit
    assert resumed.pruner.config.pruning_ratio == first.pruner.config.pruning_ratio
    assert resumed.pruner.config.group_widths == first.pruner.config.group_widths
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in resumed_model.state_dict().items()} == shapes

    checked_model, checked, trainer = run("validate")
    trainer.validate(checked_model, random_loader(32, 16), ckpt_path=str(step4), verbose=False)
    assert len(mac_timer) == measured and checked.pruner.completed_events == 1


def test_validating_without_a_checkpoint_measures_no_latency_budget(tmp_path, lit_model, mac_timer):
    from conftest import make_trainer, random_loader, step_pruning

    callback = step_pruning(importance="l2", pruning_ratio=None, target_latency=0.5, widths_for="onnx")
    make_trainer(tmp_path, [callback]).validate(lit_model, random_loader(32, 16), verbose=False)
    assert mac_timer == [] and callback.pruner is None and callback.latency_search is None


def test_a_trial_compares_the_budget_with_the_median_of_per_round_ratios(monkeypatch):
    """A host whose speed halves for a while: the two files' overall medians come from different phases
    (ratio 1.0), each round's pair from one phase (0.5): the trial's fraction is the paired one, and the
    trial is taken again because its rounds disagree."""
    from pqv_lightning.export.benchmark import paired_ratio

    def write(model, example, budget, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(b"")
        return folder / "model.onnx"

    monkeypatch.setattr(mod, "_write", write)

    def phases(candidates, shape, **kw):
        return {
            "unpruned": {"median_ms": 3.0, "round_medians_ms": [6.0, 6.0, 6.0, 3.0, 3.0], "contention_max": 0.0},
            "pruned": {"median_ms": 3.0, "round_medians_ms": [3.0, 3.0, 3.0, 1.5, 1.5], "contention_max": 0.0},
        }

    monkeypatch.setattr(mod, "round_robin", phases)
    with LatencyProbe(tiny_vit(), LatencyBudget(0.6), example_inputs=EXAMPLE) as probe:
        row = probe.measure(0.5)
    # the unpruned rounds disagree (6 vs 3 ms): taken again, up to RETAKES times, and the rounds pooled
    assert row["fraction"] == 0.5 and row["takes"] == 1 + mod.RETAKES and len(row["round_ms"]) == 15
    assert paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == 2.0
    with pytest.raises(ValueError, match="as many rounds on each side, got 2 and 1"):
        paired_ratio([1.0, 2.0], [1.0])


def test_global_allocation_measured_far_under_its_budget_allocates_again(tmp_path, mac_timer, monkeypatch):
    """The first allocation's file measures at half its true latency (the host sped up for that trial
    only): a search that took any file under the budget would keep widths far narrower than needed; this
    one recalibrates, allocates again and keeps the widest allocation that met the budget."""
    fake, calls = mod.round_robin, []

    def fast_first_allocation(candidates, shape, **kw):
        stats = fake(candidates, shape, **kw)
        calls.append(1)
        if len(calls) == 2:  # 1: the uniform max_ratio file, 2: the first allocation's
            pruned = stats["pruned"]
            stats["pruned"] = {
                **pruned,
                "median_ms": pruned["median_ms"] / 2,
                "round_medians_ms": [pruned["median_ms"] / 2],
            }
        return stats

    monkeypatch.setattr(mod, "round_robin", fast_first_allocation)
    _, info = widths_for_latency(tiny_vit(), _global(), example_inputs=EXAMPLE, cache_dir=tmp_path)
    assert info["met"] and info["passes"] >= 2
    assert 0.5 - mod.GLOBAL_UNDERSHOOT <= info["measured_fraction"] <= 0.5


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_reference_timed_in_a_slow_phase_is_retaken(tmp_path, mac_timer, monkeypatch, allocation):
    """The anchoring trial (the uniform max_ratio file against the unpruned one) lands two of its three
    rounds in a phase where the host runs at half speed: its unpruned rounds disagree (6 / 6 / 3 ms), so it
    is taken twice more, and the unpruned latency an absolute budget is divided by is the median over all
    takes' rounds, not the slow median of the first."""
    fake, calls = mod.round_robin, []

    def slow_first_take(candidates, shape, **kw):
        stats = fake(candidates, shape, **kw)
        calls.append(1)
        for label, row in stats.items():
            t = row["median_ms"]
            rounds = [2 * t, 2 * t, t] if len(calls) == 1 else [t, t, t]
            stats[label] = {**row, "median_ms": sorted(rounds)[1], "round_medians_ms": rounds}
        return stats

    monkeypatch.setattr(mod, "round_robin", slow_first_take)
    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "unpruned.pt")
    true_unpruned = 0.1 + (tmp_path / "unpruned.pt").stat().st_size / 1e5  # the mac_timer's rule
    budget = LatencyBudget(0.5 * true_unpruned, threads=1, allocation=allocation)
    if allocation == "uniform":
        _, info = ratio_for_latency(model, budget, example_inputs=EXAMPLE)
    else:
        _, info = widths_for_latency(model, budget, example_inputs=EXAMPLE, cache_dir=tmp_path)
    assert info["reference"]["takes"] == 1 + mod.RETAKES
    assert info["unpruned_ms"] == pytest.approx(true_unpruned, rel=0.02)  # the first take alone read 2x
    assert info["budget_fraction"] == pytest.approx(0.5, rel=0.02)
    reference = info["trials"]["0.900000"]
    assert reference["takes"] == 3 and len(reference["unpruned_round_ms"]) == 9  # all takes' rounds, pooled
    assert all(t["takes"] == 1 for k, t in info["trials"].items() if k != "0.900000")  # steady: not retaken


def test_a_reference_that_keeps_disagreeing_is_retaken_twice_only(mac_timer, monkeypatch):
    fake = mod.round_robin

    def always_noisy(candidates, shape, **kw):
        stats = fake(candidates, shape, **kw)
        for label, row in stats.items():
            t = row["median_ms"]
            stats[label] = {**row, "round_medians_ms": [2 * t, t, t]}
        return stats

    monkeypatch.setattr(mod, "round_robin", always_noisy)
    _, info = ratio_for_latency(tiny_vit(), LatencyBudget(0.5, threads=1), example_inputs=EXAMPLE)
    assert info["reference"]["takes"] == 1 + mod.RETAKES
    assert info["reference"]["fraction"] == pytest.approx(info["trials"]["0.900000"]["fraction"])


def test_a_global_allocation_measured_far_off_its_prediction_is_retaken_and_outvoted(tmp_path, mac_timer, monkeypatch):
    """The first allocation's file is timed in a slow phase of the host (3x, every round of that one
    take): its fraction is far off the prediction, so it is taken twice more, the pooled rounds outvote
    the slow take, and the search meets the budget instead of recalibrating on the slow measurement."""
    fake, calls = mod.round_robin, []

    def slow_take(candidates, shape, **kw):
        stats = fake(candidates, shape, **kw)
        calls.append(1)
        if len(calls) == 2:  # 1: the uniform max_ratio file; 2: the first allocation's first take
            stats["pruned"] = {**stats["pruned"], "round_medians_ms": [3 * stats["pruned"]["median_ms"]]}
        return stats

    monkeypatch.setattr(mod, "round_robin", slow_take)
    _, info = widths_for_latency(tiny_vit(), _global(), example_inputs=EXAMPLE, cache_dir=tmp_path)
    first = next(t for k, t in info["trials"].items() if k.startswith("global:"))
    assert first["takes"] == 1 + mod.RETAKES
    assert first["fraction"] == pytest.approx(first["round_ms"][1] / first["unpruned_round_ms"][1])  # not 3x
    assert info["met"] and 0.5 - mod.GLOBAL_UNDERSHOOT <= info["measured_fraction"] <= 0.5
