"""Quantization-aware training: the pure functions (torchao's numerics, exactly), the callback's start
after pruning, resume, KD + AMP + accumulation, the export of what was trained, and every refusal."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from pqv_lightning import (
    KnowledgeDistillation,
    MobileExport,
    QuantizationAwareTraining,
    load_pruned_checkpoint,
)
from pqv_lightning.classifier import ImageClassifier
from pqv_lightning.errors import ConfigError
from pqv_lightning.export import PRECISIONS, TARGETS, export_mobile
from pqv_lightning.export.intx import quantize_intx_
from pqv_lightning.export.qat import (
    QuantizationAwareTrainingConfig,
    fake_quantized_layers,
    prepare_qat_,
    set_activation_fake_quant_,
    strip_fake_quant_,
)

from conftest import image_batches, make_trainer, quick_export_config, random_loader, step_pruning, tiny_vit

needs_pte = pytest.mark.skipif(TARGETS["pte"].missing() is not None, reason="the executorch extra is not installed")
INT4, INT8W = "int8-dynamic-int4-weight", "int8-dynamic-int8-weight"


def _train_steps(model: nn.Module, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("scheme", [INT4, INT8W])
def test_fake_quantized_training_equals_torchao_post_training_quantization_of_the_stripped_model(scheme):
    """The model trained with fake quantization computes exactly what the scheme's PTQ of its float
    weights computes: the numbers QAT trains for are the numbers the exported file runs."""
    model = tiny_vit(depth=2).eval()
    params = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    names = prepare_qat_(model, scheme)
    assert len(names) == 8 and "head" not in names and set(fake_quantized_layers(model)) == set(names)
    assert {n: id(p) for n, p in model.named_parameters()} == params  # an optimizer built before keeps working
    assert list(model.state_dict()) == keys  # checkpoints keep the plain model's keys
    _train_steps(model)
    model.eval()
    x = torch.randn(16, 1, 32, 32)
    with torch.no_grad():
        fake = model(x)
    stripped = copy.deepcopy(model)
    trained = strip_fake_quant_(stripped)
    assert trained == {
        "weight_bits": PRECISIONS[scheme].weight_bits,
        "group_size": PRECISIONS[scheme].group_size,
        "activations": True,
        "layers": sorted(names),
    }
    assert fake_quantized_layers(stripped) == {} and type(stripped.blocks[0].mlp.fc1) is nn.Linear
    with torch.no_grad():
        float_out = stripped(x)
        quantize_intx_(stripped, PRECISIONS[scheme])
        ptq = stripped(x)
    assert torch.equal(fake, ptq)
    assert not torch.equal(fake, float_out)  # the fake quantizers did change the forward


def test_activation_fake_quant_can_be_switched_off_and_on():
    model = tiny_vit(depth=1).eval()
    prepare_qat_(model, INT4)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        both = model(x)
        assert set_activation_fake_quant_(model, False) == 4
        weights_only = model(x)
        set_activation_fake_quant_(model, True)
        again = model(x)
    assert torch.equal(both, again) and not torch.equal(both, weights_only)
    set_activation_fake_quant_(model, False)
    assert strip_fake_quant_(model)["activations"] is False


def test_strip_returns_none_for_a_model_without_fake_quantization():
    model = tiny_vit(depth=1)
    assert strip_fake_quant_(model) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(scheme="int3"), r"unknown QAT scheme 'int3'; allowed: \['int8-dynamic-int4-weight', 'int8-dynamic-int8"),
        (dict(scheme="int8-dynamic"), r"QAT scheme 'int8-dynamic' is not one QAT can train for .*allowed: \["),
        (dict(start_step=-1), r"start_step"),
        (dict(start_step=2, start_epoch=1), r"start_step=2 and start_epoch=1: give one of them, or neither"),
        (dict(activation_delay_steps=1.5), r"activation_delay_steps"),
    ],
)
def test_bad_qat_options_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantizationAwareTrainingConfig(**kwargs).validate()
    with pytest.raises(ConfigError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_prepare_refuses_a_bad_group_no_linear_and_a_second_prepare():
    with pytest.raises(ConfigError, match=r"greatest common divisor is 48\): use group_size=None"):
        prepare_qat_(tiny_vit(depth=1, embed_dim=48, num_heads=3), INT4)
    with pytest.raises(ConfigError, match="Sequential has no Linear layer to quantize"):
        prepare_qat_(nn.Sequential(nn.Conv2d(1, 4, 3)), INT4)
    model = tiny_vit(depth=1)
    prepare_qat_(model, INT8W)
    with pytest.raises(ConfigError, match=r"fake-quantized already \(4 layers"):
        prepare_qat_(model, INT4)


# ---------------------------------------------------------------------------------------------- the callback
class _Record(pl.Callback):
    """Per optimizer step: how many layers are fake-quantized, and whether their activations are."""

    def __init__(self):
        self.steps: list[tuple[int, int, bool | None]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = fake_quantized_layers(pl_module.model)
        act = next(iter(layers.values())).activation_fake_quantizer.enabled if layers else None
        self.steps.append((trainer.global_step, len(layers), act))


def test_qat_starts_right_after_the_last_pruning_event_with_activations_delayed(tmp_path, lit_model):
    pruning = step_pruning(round_to=32)  # events after steps 3 and 6
    qat = QuantizationAwareTraining(scheme=INT4, activation_delay_steps=2)
    record = _Record()
    trainer = make_trainer(tmp_path, [pruning, qat, record], max_steps=10, max_epochs=None)
    trainer.fit(lit_model, random_loader(128))
    assert [e.params_after for e in pruning.events] and len(pruning.events) == 2
    started = qat.started_step
    assert started == 6  # the batch after the last event
    before = [s for s in record.steps if s[0] <= started]
    assert all(n == 0 for _, n, _ in before)
    after = [s for s in record.steps if s[0] > started]
    assert all(n == 8 for _, n, _ in after)
    assert [a for step, _, a in after] == [step > started + 2 for step, _, _ in after]
    # the pruned widths are multiples of the group: every fake-quantized layer took it
    assert all(m.in_features % 32 == 0 for m in fake_quantized_layers(lit_model.model).values())


def test_a_start_before_the_last_pruning_event_is_refused_before_training(tmp_path, lit_model):
    trainer = make_trainer(
        tmp_path, [step_pruning(round_to=32), QuantizationAwareTraining(start_step=3)], max_steps=10, max_epochs=None
    )
    with pytest.raises(ConfigError, match=r"starts at optimizer step 3, before StructuredPruning's last event \(after"):
        trainer.fit(lit_model, random_loader(64))
    assert trainer.global_step == 0


def test_pruning_widths_the_group_may_not_divide_are_refused_before_training(tmp_path, lit_model):
    trainer = make_trainer(tmp_path, [step_pruning(), QuantizationAwareTraining(scheme=INT4)], max_steps=10)
    with pytest.raises(ConfigError, match=r"StructuredPruning\(round_to=None\) may leave widths .*\(round_to=32\)"):
        trainer.fit(lit_model, random_loader(64))
    assert trainer.global_step == 0


def test_a_mobile_export_that_does_not_write_the_scheme_is_refused_before_training(tmp_path, lit_model):
    export = MobileExport(precisions=["fp32", "int8-dynamic"], formats=["onnx"], output_dir=str(tmp_path / "x"))
    trainer = make_trainer(tmp_path, [QuantizationAwareTraining(scheme=INT4), export], max_steps=2)
    with pytest.raises(
        ConfigError, match=r"add precision 'int8-dynamic-int4-weight' and one of the formats .*\['pte'\]"
    ):
        trainer.fit(lit_model, random_loader(64))
    assert trainer.global_step == 0


def test_a_network_without_linear_layers_to_quantize_is_refused_before_training(tmp_path):
    class ConvOnly(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = make_trainer(tmp_path, [QuantizationAwareTraining(model_attr="model")], max_steps=2)
    with pytest.raises(ConfigError, match="Sequential has no Linear layer to quantize"):
        trainer.fit(ConvOnly(), random_loader(32))


def test_fsdp_is_refused(tmp_path, lit_model):
    from lightning.pytorch.strategies import FSDPStrategy

    qat = QuantizationAwareTraining()

    class Fake:
        strategy = FSDPStrategy.__new__(FSDPStrategy)
        callbacks: list = []

    with pytest.raises(ConfigError, match="QuantizationAwareTraining does not support strategy FSDPStrategy"):
        qat.setup(Fake(), lit_model, "fit")  # type: ignore[arg-type]


def _digest(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_resume_from_a_checkpoint_taken_during_qat_is_exact(tmp_path):
    """Uninterrupted: 2 epochs of 8 steps, QAT from step 4, a checkpoint after epoch 0. Resumed from it
    into a fresh module: every weight at the end equals the uninterrupted run's."""

    def run(root, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        module = ImageClassifier("vit_test_tiny", lr=1e-3)
        qat = QuantizationAwareTraining(scheme=INT4, start_step=4, activation_delay_steps=6)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
        trainer = make_trainer(root, [qat, checkpoint], max_epochs=2, enable_checkpointing=True)
        trainer.fit(module, random_loader(128, batch_size=16), ckpt_path=ckpt_path)
        return module, qat

    a, qat_a = run(tmp_path / "a")
    ckpt = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["callbacks"][qat_a.state_key] == {"started_step": 4}
    (ckpt_copy := tmp_path / "epoch0.ckpt").write_bytes(ckpt.read_bytes())
    b, qat_b = run(tmp_path / "b", ckpt_path=str(ckpt_copy))
    assert qat_b.started_step == 4 and len(fake_quantized_layers(b.model)) == 8
    assert all(torch.equal(p, q) for p, q in zip(_digest(a), _digest(b)))
    # a checkpoint taken during QAT loads into a fresh, float module
    loaded = load_pruned_checkpoint(ImageClassifier, ckpt_copy, map_location="cpu")
    assert fake_quantized_layers(loaded.model) == {}
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in loaded.state_dict().items())


def test_qat_composes_with_distillation_bf16_and_gradient_accumulation(tmp_path, lit_model):
    record = _Record()
    qat = QuantizationAwareTraining(scheme=INT8W, start_step=2)
    kd = KnowledgeDistillation(alpha=0.5, tau=2.0)
    trainer = make_trainer(
        tmp_path, [kd, qat, record], max_steps=5, max_epochs=None, accumulate_grad_batches=2, precision="bf16-mixed"
    )
    trainer.fit(lit_model, random_loader(128))
    assert qat.started_step == 2
    # two micro-batches per optimizer step; fake quantization starts on the first one of step 2's window
    assert [n for _, n, _ in record.steps] == [0] * 4 + [4 + 4] * 6
    assert fake_quantized_layers(kd.teacher) == {}  # the teacher stays the float network
    assert torch.isfinite(trainer.callback_metrics["train/loss"]).item()


@pytest.mark.slow  # fast tier <= 5 min on 2 cores (issue 29); the fast tier checks the numerics it relies on exactly
@needs_pte
def test_mobile_export_writes_what_qat_trained(tmp_path, lit_model):
    """Pruned, then QAT, then exported: the int4 ``.pte`` file agrees with the fake-quantized network's
    top-1 on the test batches (>= 99 %), and the manifest says which file came from QAT."""
    config = quick_export_config(tmp_path / "export")
    export = MobileExport(
        precisions=[INT4],
        formats=["pte"],
        output_dir=config.output_dir,
        repeats=2,
        warmup=1,
        measure_memory=False,
        rank="in-process",
        jobs=1,
        min_top1_agreement=0.0,
    )
    qat = QuantizationAwareTraining(scheme=INT4)
    trainer = make_trainer(tmp_path, [step_pruning(round_to=32), qat, export], max_steps=9, max_epochs=None)
    trainer.fit(lit_model, random_loader(128), val_dataloaders=random_loader(32))
    manifest = export.manifest
    assert manifest["qat"]["matches"] == [INT4] and manifest["qat"]["weight_bits"] == 4
    by_precision = {a["precision"]: a for a in manifest["artifacts"]}
    assert by_precision[INT4]["from_qat"] is True
    assert by_precision[INT4]["status"] == "ok", by_precision[INT4].get("reason")
    # the file, run by ExecuTorch, against the fake-quantized network in memory
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(tmp_path / "export" / by_precision[INT4]["file"])).load_method("forward")
    network = lit_model.model.eval()
    agree = total = 0
    for x, _ in image_batches(4, batch=8, seed=3):
        with torch.no_grad():
            fake = network(x)
        exported = torch.cat([method.execute([x[i : i + 1]])[0] for i in range(len(x))])
        agree += int((fake.argmax(-1) == exported.argmax(-1)).sum())
        total += len(x)
        assert torch.nn.functional.cosine_similarity(fake, exported, dim=-1).min() > 0.999
    assert agree / total >= 0.99
    # export_mobile strips a copy: the trained module keeps its fake quantizers
    assert len(fake_quantized_layers(lit_model.model)) == 8


def test_export_mobile_says_no_file_matches_when_activations_were_never_fake_quantized(tmp_path):
    model = tiny_vit(depth=1)
    prepare_qat_(model, INT4)
    set_activation_fake_quant_(model, False)
    config = quick_export_config(tmp_path / "out", formats=["onnx"], precisions=["fp32"], min_top1_agreement=0.0)
    if TARGETS["onnx"].missing() is not None:
        pytest.skip("the onnx extra is not installed")
    manifest = export_mobile(model, torch.randn(1, 1, 32, 32), config, validation_data=image_batches(1))
    assert manifest["qat"]["activations"] is False and manifest["qat"]["matches"] == []
    assert [a["from_qat"] for a in manifest["artifacts"]] == [False]
    assert len(fake_quantized_layers(model)) == 4  # the caller's model is untouched


def test_a_second_fit_goes_on_with_the_fake_quantized_network_and_refuses_another_scheme(tmp_path, lit_model):
    first = QuantizationAwareTraining(scheme=INT4)
    make_trainer(tmp_path, [first], max_steps=2, max_epochs=None).fit(lit_model, random_loader(64))
    weights = [p.detach().clone() for p in lit_model.parameters()]
    again = QuantizationAwareTraining(scheme=INT4)  # a new callback, the same scheme: it adopts the layers
    make_trainer(tmp_path, [again], max_steps=2, max_epochs=None).fit(lit_model, random_loader(64))
    assert again.started_step == 0 and again.layers == sorted(first.layers)
    assert len(fake_quantized_layers(lit_model.model)) == 8
    assert not all(torch.equal(a, b) for a, b in zip(weights, lit_model.parameters()))  # it trained on
    with pytest.raises(ConfigError, match=r"fake-quantized already for another scheme \(4-bit weights, group 32, 8"):
        make_trainer(tmp_path, [QuantizationAwareTraining(scheme=INT8W)], max_steps=2, max_epochs=None).fit(
            lit_model, random_loader(64)
        )


def test_qat_that_never_starts_says_so(tmp_path, lit_model):
    qat = QuantizationAwareTraining(start_step=100)
    with pytest.warns(
        UserWarning, match=r"QuantizationAwareTraining never started: training ended before start_step=100"
    ):
        make_trainer(tmp_path, [qat], max_steps=2, max_epochs=None).fit(lit_model, random_loader(64))
    assert qat.started_step is None and fake_quantized_layers(lit_model.model) == {}
