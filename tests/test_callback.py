import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy

from pqv_lightning import CHECKPOINT_KEY, StructuredPruning, load_pruned_checkpoint
from pqv_lightning.classifier import ImageClassifier
from pqv_lightning.errors import ConfigError

from conftest import make_trainer, random_loader


class EventProbe(pl.Callback):
    """Records the global step whenever the parameter count changes (runs after StructuredPruning)."""

    def __init__(self):
        self.steps, self.params, self.optimizer_exact = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = sum(p.numel() for p in pl_module.parameters())
        if not self.params or n != self.params[-1]:
            self.steps.append(trainer.global_step)
            self.params.append(n)
        live = {id(p) for p in pl_module.parameters()}
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        self.optimizer_exact.append(live == held)


def test_epoch_schedule_prunes_after_the_window_and_keeps_optimizer_exact(tmp_path, lit_model):
    pruning = StructuredPruning(
        importance="taylor",
        pruning_ratio=0.5,
        iterative_steps=2,
        accumulate_batches=3,
        interval="epoch",
        start=0,
        frequency=2,
    )
    probe = EventProbe()
    trainer = make_trainer(tmp_path, [pruning, probe], max_epochs=3)
    trainer.fit(lit_model, random_loader(128, 16))  # 8 steps per epoch
    # baseline, event after step 3 of epoch 0, event after step 3 of epoch 2
    assert probe.steps == [1, 3, 19]
    assert [e.index for e in pruning.events] == [1, 2]
    assert [e.statistics_steps for e in pruning.events] == [3, 3]
    assert all(probe.optimizer_exact)
    assert lit_model.model.patch_embed.proj.out_channels == 32


def test_step_schedule_and_lr_scheduler_and_adam_state_continue(tmp_path, lit_model):
    pruning = StructuredPruning(
        importance="l2",
        pruning_ratio=0.5,
        iterative_steps=2,
        accumulate_batches=2,
        interval="step",
        start=3,
        frequency=5,
    )
    probe = EventProbe()
    trainer = make_trainer(tmp_path, [pruning, probe], max_epochs=2)
    trainer.fit(lit_model, random_loader(128, 16))
    assert probe.steps == [1, 5, 10]
    opt = trainer.optimizers[0]
    steps_in_state = {int(s["step"]) for s in opt.state.values()}
    assert steps_in_state == {16}  # Adam state was sliced, never reset
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 16 and sched.optimizer is opt
    total = 16
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 16 / total)), abs=1e-12)


def test_gradient_accumulation_hessian_uses_every_micro_batch(tmp_path, lit_model):
    pruning = StructuredPruning(importance="hessian", pruning_ratio=0.25, iterative_steps=1, accumulate_batches=2)
    probe = EventProbe()
    trainer = make_trainer(tmp_path, [pruning, probe], max_epochs=1, accumulate_grad_batches=4)
    trainer.fit(lit_model, random_loader(128, 8))  # 16 micro-batches, 4 optimizer steps
    (event,) = pruning.events
    assert event.statistics_steps == 2 and event.statistics_samples == 8
    assert probe.steps == [0, 2]  # only at an optimizer-step boundary
    assert all(probe.optimizer_exact)


@pytest.mark.parametrize("precision", ["16-mixed-scaler", "bf16-mixed"])
def test_mixed_precision_keeps_working(tmp_path, lit_model, precision):
    kwargs = {}
    if precision == "16-mixed-scaler":  # Lightning would silently use bf16 on CPU; force a real GradScaler
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))]
    else:
        kwargs["precision"] = "bf16-mixed"
    pruning = StructuredPruning(importance="hessian", pruning_ratio=0.5, iterative_steps=2, accumulate_batches=2)
    trainer = make_trainer(tmp_path, [pruning], max_epochs=2, **kwargs)
    trainer.fit(lit_model, random_loader(64, 16))
    assert len(pruning.events) == 2
    assert lit_model.model.patch_embed.proj.out_channels == 32
    assert all(torch.isfinite(p).all() for p in lit_model.parameters())


def test_events_are_logged_to_every_logger(tmp_path, lit_model):
    pruning = StructuredPruning(importance="l1", pruning_ratio=0.5, iterative_steps=2, accumulate_batches=1)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, [pruning], max_epochs=2, logger=logger, log_every_n_steps=1)
    trainer.fit(lit_model, random_loader(64, 16))
    with open(logger.experiment.metrics_file_path) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("pruning/params")]
    assert [int(float(r["pruning/event"])) for r in rows] == [1, 2]
    assert int(float(rows[-1]["pruning/params"])) == sum(p.numel() for p in lit_model.parameters())
    assert float(rows[-1]["pruning/ratio_reached"]) == pytest.approx(0.5, abs=0.02)
    assert float(rows[0]["pruning/macs"]) > float(rows[1]["pruning/macs"]) > 0
    assert float(rows[0]["pruning/event_seconds"]) > 0


def _fit_count(model):
    calls = {"n": 0}
    original = model.training_step

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    model.training_step = counting
    return calls


@pytest.mark.parametrize(
    "kwargs, trainer_kwargs, message",
    [
        (dict(iterative_steps=3, start=1, frequency=1), dict(max_epochs=3), r"needs epoch 3 .* but max_epochs=3"),
        (
            dict(iterative_steps=2, interval="step", start=10, frequency=10, accumulate_batches=4),
            dict(max_steps=20),
            r"needs optimizer step 24 .* max_steps=20",
        ),
        (
            dict(iterative_steps=1, accumulate_batches=50),
            dict(max_epochs=1),
            r"accumulate_batches=50 exceeds the 8 optimizer steps of one epoch",
        ),
        (
            dict(iterative_steps=2, interval="step", start=5, frequency=5, accumulate_batches=2),
            dict(max_epochs=1),
            r"needs optimizer step 12 but this fit runs 8 steps",
        ),
    ],
)
def test_schedule_errors_are_raised_before_training(tmp_path, lit_model, kwargs, trainer_kwargs, message):
    calls = _fit_count(lit_model)
    trainer = make_trainer(tmp_path, [StructuredPruning(**kwargs)], **trainer_kwargs)
    with pytest.raises(ValueError, match=message):
        trainer.fit(lit_model, random_loader(128, 16))
    assert calls["n"] == 0


def test_frozen_parameters_with_gradient_criterion_are_refused_before_training(tmp_path, lit_model):
    lit_model.model.blocks[1].requires_grad_(False)
    calls = _fit_count(lit_model)
    trainer = make_trainer(tmp_path, [StructuredPruning(importance="taylor", iterative_steps=1)], max_epochs=1)
    with pytest.raises(ValueError, match=r"importance='taylor' needs gradients.*blocks\.1"):
        trainer.fit(lit_model, random_loader(64, 16))
    assert calls["n"] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(interval="batch"), r"interval='batch' is not supported; allowed: \['epoch', 'step'\]"),
        (dict(interval="step", frequency=2, accumulate_batches=4), r"frequency=2 steps is shorter than accumulate"),
        (dict(accumulate_batches=0), r"accumulate_batches=0 must be an integer >= 1"),
        (dict(pruning_ratio=1.5), r"pruning_ratio=1.5 must be a finite number >= 0 and < 1"),
        (dict(importance="snip"), r"importance='snip' is not registered"),
        (
            dict(widths_for="tflite"),
            r"widths_for='tflite' is not registered; allowed: \['pte', 'onnx', 'ptl', 'openvino'\]",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(**kwargs)


def test_widths_for_sets_the_callbacks_width_rule():
    assert (StructuredPruning().config.prune_num_heads, StructuredPruning().config.prune_head_dims) == (False, True)
    config = StructuredPruning(widths_for="openvino").config
    assert (config.prune_num_heads, config.prune_head_dims) == (True, False)
    assert StructuredPruning(widths_for="openvino").widths_for == "openvino"
    config = StructuredPruning(widths_for="openvino", prune_head_dims=True).config
    assert (config.prune_num_heads, config.prune_head_dims) == (True, True)


def test_sharding_strategies_are_refused(tmp_path, lit_model):
    class RestoresAfterSetup(SingleDeviceStrategy):  # the property FSDP/DeepSpeed/ModelParallel set
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    trainer = make_trainer(
        tmp_path,
        [StructuredPruning(iterative_steps=1)],
        max_epochs=1,
        strategy=RestoresAfterSetup(device=torch.device("cpu")),
    )
    with pytest.raises(ValueError, match="does not support strategy RestoresAfterSetup"):
        trainer.fit(lit_model, random_loader(64, 16))


def test_fsdp_and_weight_averaging_are_refused_with_a_clear_error():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from lightning.pytorch.strategies import FSDPStrategy

    pruning = StructuredPruning(iterative_steps=1)
    with pytest.raises(ValueError, match="does not support strategy FSDPStrategy"):
        pruning._check_strategy(SimpleNamespace(strategy=FSDPStrategy(), callbacks=[]))
    swa = SimpleNamespace(
        strategy=SingleDeviceStrategy(device=torch.device("cpu")), callbacks=[StochasticWeightAveraging(swa_lrs=0.1)]
    )
    with pytest.raises(ValueError, match=r"cannot run with \['StochasticWeightAveraging'\]"):
        pruning._check_strategy(swa)


# ---------------------------------------------------------------------------------------------- checkpoints
class StopAfterEpoch(pl.Callback):
    """Simulates an interrupted run: stops after the given epoch (checkpoints of it are written)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _resume_setup(tmp_path, name, stop_after=None, ckpt_cb=None, reconstruct=False):
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier("vit_test_tiny", lr=1e-3)
    # windows of 4 steps opening after steps 6 and 14 straddle the epoch boundaries (8 steps / epoch)
    pruning = StructuredPruning(
        importance="taylor",
        pruning_ratio=0.5,
        iterative_steps=2,
        accumulate_batches=4,
        interval="step",
        start=6,
        frequency=8,
        reconstruct=reconstruct,
        reconstruct_samples=48,
    )
    cbs = [pruning] + ([ckpt_cb] if ckpt_cb else []) + ([StopAfterEpoch(stop_after)] if stop_after is not None else [])
    trainer = make_trainer(tmp_path / name, cbs, max_epochs=3, enable_checkpointing=ckpt_cb is not None)
    return model, pruning, trainer


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_after, saved_events, saved_window, events_after_resume, reconstruct",
    [
        (0, 0, 2, [1, 2], False),  # interrupted inside the first window: 2 of its 4 steps gathered
        (1, 1, 2, [2], False),  # after event 1 and half of window 2: event 1 not repeated, event 2 not skipped
        (0, 0, 2, [1, 2], True),  # reconstruction: the window's inputs gathered so far travel in the checkpoint
    ],
)
def test_resume_matches_uninterrupted_run(
    tmp_path, stop_after, saved_events, saved_window, events_after_resume, reconstruct
):
    ref_model, _, ref_trainer = _resume_setup(tmp_path, "ref", reconstruct=reconstruct)
    ref_trainer.fit(ref_model, random_loader(128, 16))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model, pruning, trainer = _resume_setup(tmp_path, "a", stop_after, ckpt, reconstruct=reconstruct)
    trainer.fit(model, random_loader(128, 16))
    path = tmp_path / "ckpt" / f"epoch={stop_after}-step={8 * (stop_after + 1)}.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved[CHECKPOINT_KEY]["current_step"] == saved_events
    assert saved["callbacks"][pruning.state_key]["window_steps"] == saved_window
    assert sum(len(t) for t in saved["callbacks"][pruning.state_key]["calibration"]) == (32 if reconstruct else 0)

    model2, pruning2, trainer2 = _resume_setup(tmp_path, "b", reconstruct=reconstruct)
    trainer2.fit(model2, random_loader(128, 16), ckpt_path=str(path))
    assert [e.index for e in pruning2.pruner.events] == events_after_resume  # events run by this process
    assert [e.index for e in pruning2.events] == [1, 2]  # the callback's record survives the resume
    ref_sd, sd = ref_model.state_dict(), model2.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    for k, v in ref_sd.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("weights_only", [False, True])
def test_load_pruned_checkpoint(tmp_path, lit_model, weights_only):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_weights_only=weights_only)
    pruning = StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=2, accumulate_batches=1)
    trainer = make_trainer(tmp_path, [pruning, ckpt], max_epochs=2, enable_checkpointing=True)
    trainer.fit(lit_model, random_loader(64, 16))
    path = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(RuntimeError, match="size mismatch"):
        ImageClassifier.load_from_checkpoint(path)  # why the helper exists
    loaded = load_pruned_checkpoint(ImageClassifier, path, map_location="cpu")
    assert "on_load_checkpoint" not in ImageClassifier.__dict__  # the temporary hook is gone
    lit_model.eval(), loaded.eval()
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(lit_model(x), loaded(x))
    assert loaded.model.blocks[0].attn.head_dim == lit_model.model.blocks[0].attn.head_dim == 8


def test_load_pruned_checkpoint_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pruned_checkpoint(ImageClassifier, tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match="LightningModule subclass"):
        load_pruned_checkpoint(torch.nn.Linear, tmp_path / "missing.ckpt")


def test_module_hooks_after_fit_leave_a_picklable_structure_writer(tmp_path, lit_model):
    import copy
    import pickle

    trainer = make_trainer(tmp_path, [StructuredPruning(iterative_steps=1, accumulate_batches=1)], max_epochs=1)
    trainer.fit(lit_model, random_loader(32, 16))
    assert "on_load_checkpoint" not in lit_model.__dict__  # the load-side shadow belongs to one stage
    clone = pickle.loads(pickle.dumps(lit_model))  # ddp_spawn / torch.save(module) still work
    assert (
        clone.on_save_checkpoint.module is clone and copy.deepcopy(lit_model).on_save_checkpoint.module is not lit_model
    )
    checkpoint = {}
    lit_model.on_save_checkpoint(checkpoint)
    assert checkpoint[CHECKPOINT_KEY]["current_step"] == 1


@pytest.mark.parametrize("weights_only", [False, True])
def test_checkpoint_saved_after_fit_reloads_pruned(tmp_path, lit_model, weights_only):
    pruning = StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=2, accumulate_batches=1)
    trainer = make_trainer(tmp_path, [pruning], max_epochs=2)
    trainer.fit(lit_model, random_loader(64, 16))
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path, weights_only=weights_only)  # the usual way to keep the final model
    assert torch.load(path, weights_only=True)[CHECKPOINT_KEY]["current_step"] == 2
    loaded = load_pruned_checkpoint(ImageClassifier, path, map_location="cpu")
    lit_model.eval(), loaded.eval()
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(lit_model(x), loaded(x))


def test_model_checkpoint_last_and_best_files_carry_the_structure(tmp_path, lit_model):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor="val/loss", save_top_k=1, filename="best")
    pruning = StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=2, accumulate_batches=1)
    trainer = make_trainer(tmp_path, [pruning, ckpt], max_epochs=2, enable_checkpointing=True)
    trainer.fit(lit_model, random_loader(64, 16), random_loader(32, 16))
    for name in ("last.ckpt", "best.ckpt"):
        saved = torch.load(tmp_path / "ckpt" / name, weights_only=True)
        assert saved[CHECKPOINT_KEY]["current_step"] >= 1, name
        loaded = load_pruned_checkpoint(ImageClassifier, tmp_path / "ckpt" / name, map_location="cpu")
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, saved["state_dict"][key]), (name, key)


def test_pruned_weights_without_structure_give_one_clear_error(tmp_path, lit_model):
    pruning = StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=1, accumulate_batches=1)
    trainer = make_trainer(tmp_path, [pruning], max_epochs=1)
    trainer.fit(lit_model, random_loader(32, 16))
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint[CHECKPOINT_KEY]  # as an older release or a hand-made save would write it
    torch.save(checkpoint, path)
    with pytest.raises(
        ValueError, match=r"other shapes than ImageClassifier in \d+ tensors .*no 'pqv_structured_pruning'"
    ):
        load_pruned_checkpoint(ImageClassifier, path)
    # the same inside a Trainer stage: a fresh, unpruned module validated on that file
    fresh = ImageClassifier("vit_test_tiny", lr=1e-3)
    tester = make_trainer(tmp_path / "v", [StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=1)])
    with pytest.raises(ValueError, match="no 'pqv_structured_pruning' entry"):
        tester.validate(fresh, random_loader(32, 16), ckpt_path=str(path))


def test_module_without_a_vit_is_refused_before_training(tmp_path):
    class NoViT(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1024, 10)

        def training_step(self, batch, batch_idx):
            raise AssertionError("training must not start")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = make_trainer(tmp_path, [StructuredPruning(iterative_steps=1)], max_epochs=1)
    with pytest.raises(ValueError, match="no prunable model found in NoViT"):
        trainer.fit(NoViT(), random_loader(32, 16))


def test_test_and_validate_with_ckpt_path_rebuild_pruned_shapes(tmp_path, lit_model):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    pruning = StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=2, accumulate_batches=1)
    trainer = make_trainer(tmp_path, [pruning, ckpt], max_epochs=2, enable_checkpointing=True)
    trainer.fit(lit_model, random_loader(32, 16), random_loader(32, 16))
    last = tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    first = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    trainer.validate(lit_model, random_loader(32, 16), ckpt_path=str(last))  # same structure as in memory
    with pytest.raises(ValueError, match="after 1 pruning events, the model in memory has had 2"):
        trainer.validate(lit_model, random_loader(32, 16), ckpt_path=str(first))

    pl.seed_everything(0, verbose=False)
    fresh = ImageClassifier("vit_test_tiny", lr=1e-3)  # an unpruned module, a new Trainer
    tester = make_trainer(tmp_path / "t", [StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=2)])
    (metrics,) = tester.test(fresh, random_loader(32, 16), ckpt_path=str(first))
    assert fresh.model.patch_embed.proj.out_channels == 48 and "test/acc" in metrics


def test_compiled_network_is_refused(tmp_path, lit_model):
    lit_model.model = torch.compile(lit_model.model)
    trainer = make_trainer(tmp_path, [StructuredPruning(iterative_steps=1)], max_epochs=1)
    with pytest.raises(ValueError, match="inside a torch.compile wrapper"):
        trainer.fit(lit_model, random_loader(32, 16))


@pytest.mark.slow
def test_a_mac_budget_is_reached_at_the_last_event(tmp_path, lit_model):
    from pqv_lightning.pruning import count_macs

    x = torch.randn(1, 1, 32, 32)
    full = count_macs(lit_model.model, x)
    pruning = StructuredPruning(
        importance="taylor", target_macs=0.55, iterative_steps=2, accumulate_batches=1, ratio_schedule="cubic"
    )
    trainer = make_trainer(tmp_path, [pruning], max_epochs=2)
    trainer.fit(lit_model, random_loader(64, 16))
    macs = count_macs(lit_model.model, x)
    assert 0.5 * full < macs <= 0.55 * full  # on the budget, within a channel group
    assert pruning.events[-1].macs_after == macs and "target_macs" in pruning.state_key


@pytest.mark.slow
def test_a_global_mac_budget_is_reached_at_the_last_event(tmp_path, lit_model):
    from pqv_lightning.pruning import count_macs

    x = torch.randn(1, 1, 32, 32)
    full = count_macs(lit_model.model, x)
    pruning = StructuredPruning(
        importance="taylor", target_macs=0.55, iterative_steps=2, accumulate_batches=1, global_pruning=True
    )
    make_trainer(tmp_path, [pruning], max_epochs=2).fit(lit_model, random_loader(64, 16))
    macs = count_macs(lit_model.model, x)
    assert 0.97 * 0.55 * full < macs <= 0.55 * full


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pruning_ratio=0.3, target_macs=0.5), "give a pruning_ratio .* or a budget"),
        (dict(target_macs=0.5, target_params=0.5), "give one budget, not both"),
        (dict(target_params=-1), r"target_params=-1 is out of range"),
        (dict(target_macs=0.5, global_pruning=True, importance="random"), "needs a deterministic criterion"),
    ],
)
def test_bad_budgets_are_refused_when_the_callback_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(**kwargs)


def test_an_unreachable_budget_fails_before_training(tmp_path, lit_model):
    calls = _fit_count(lit_model)
    trainer = make_trainer(tmp_path, [StructuredPruning(target_params=100, iterative_steps=1)], max_epochs=1)
    with pytest.raises(ValueError, match="target_params=100 .* cannot be reached"):
        trainer.fit(lit_model, random_loader(32, 16))
    assert calls["n"] == 0
