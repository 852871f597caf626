"""KnowledgeDistillation: the loss against a hand-computed reference, the frozen unpruned teacher beside
StructuredPruning, the loss going through Lightning's machinery, resume, cheaper teachers, bad input."""

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from pqv_lightning import KnowledgeDistillation, StructuredPruning
from pqv_lightning.classifier import ImageClassifier
from pqv_lightning.distillation import (
    distillation_loss,
    frozen_teacher,
    resolve_teacher_precision,
    teacher_logits,
)
from pqv_lightning.errors import ConfigError
from pqv_lightning.models import save_vit_checkpoint

from conftest import make_trainer, random_loader, tiny_vit


def test_loss_and_gradient_equal_a_hand_computed_reference():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 10, generator=g, requires_grad=True)
    teacher = torch.randn(4, 10, generator=g)
    tau = 2.0
    loss = distillation_loss(student, teacher, tau)
    p_t = [[math.exp(v / tau) for v in row] for row in teacher.tolist()]
    p_s = [[math.exp(v / tau) for v in row] for row in student.tolist()]
    ref = 0.0
    for t_row, s_row in zip(p_t, p_s):
        zt, zs = sum(t_row), sum(s_row)
        ref += sum(t / zt * (math.log(t / zt) - math.log(s / zs)) for t, s in zip(t_row, s_row))
    assert loss.item() == pytest.approx(tau**2 * ref / 4, rel=1e-5)
    loss.backward()
    # d/ds of tau² KL(p_t || p_s) / N = tau (softmax(s/tau) - softmax(t/tau)) / N
    expected = tau * (torch.softmax(student.detach() / tau, -1) - torch.softmax(teacher / tau, -1)) / 4
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)
    hard = distillation_loss(student, teacher, tau, hard=True)
    assert hard.item() == pytest.approx(torch.nn.functional.cross_entropy(student, teacher.argmax(-1)).item())


def test_teacher_is_frozen_and_independent_of_the_student():
    net = tiny_vit()
    teacher = frozen_teacher(net)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        net.head.weight.add_(1.0)
    assert not torch.equal(teacher.head.weight, net.head.weight)


@pytest.mark.parametrize("precision", ["bf16", "int8-dynamic"])
def test_cheaper_teachers_agree_with_the_fp32_teacher(precision):
    net = tiny_vit(embed_dim=128, depth=2)
    x = torch.randn(32, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    fp32 = teacher_logits(frozen_teacher(net), x)
    cheap = teacher_logits(frozen_teacher(net, precision), x, precision)
    assert cheap.dtype == torch.float32 and cheap.shape == fp32.shape
    assert torch.nn.functional.cosine_similarity(cheap, fp32, dim=-1).min() > 0.99


AVX2_ONLY = {"model name": "AMD EPYC", "flags": "fpu sse avx2 fma f16c"}
SAPPHIRE_RAPIDS = {"model name": "Intel(R) Xeon(R)", "flags": "avx2 avx512f avx512_bf16 amx_bf16 amx_int8"}
ARM_BF16 = {"Features": "fp asimd asimddp bf16"}


@pytest.mark.parametrize(
    ("cpu", "expected"), [(AVX2_ONLY, "fp32"), (SAPPHIRE_RAPIDS, "bf16"), (ARM_BF16, "bf16"), ({}, "fp32")]
)
def test_auto_teacher_precision_is_bf16_only_where_the_cpu_computes_it(cpu, expected):
    """bf16 emulated on an AVX2-only CPU cost 3.9x a step without teacher (fp32: 1.25x): "auto" takes fp32
    there, bf16 where the CPU has bf16 instructions; explicit choices are kept whatever the host."""
    cpu_device = torch.device("cpu")
    assert resolve_teacher_precision("auto", cpu_device, cpu) == expected
    for explicit in ("fp32", "bf16", "int8-dynamic"):
        assert resolve_teacher_precision(explicit, cpu_device, cpu) == explicit
    with pytest.raises(ConfigError, match=r"teacher_precision='bf17'.*allowed: .*'auto'"):
        resolve_teacher_precision("bf17", cpu_device, cpu)


def test_an_auto_teacher_runs_as_resolved_for_this_host(tmp_path, lit_model, caplog):
    """The callback resolves "auto" at fit start, says what it chose, and runs the teacher that way."""
    expected = resolve_teacher_precision("auto", torch.device("cpu"))
    kd = KnowledgeDistillation(alpha=0.5, teacher_precision="auto")
    trainer = make_trainer(tmp_path, [kd], max_steps=2)
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        trainer.fit(lit_model, random_loader(64, 16))
    assert kd.teacher_precision == "auto" and kd._precision == expected
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(
        teacher_logits(kd.teacher, x, "auto"), teacher_logits(frozen_teacher(kd.teacher, expected), x, expected)
    )
    assert f"teacher_precision='auto' -> '{expected}' on this cpu" in caplog.text


class _Snapshot(pl.Callback):
    """Records the network's weights when fit starts (before any pruning event)."""

    def on_fit_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


class _AtFitEnd(pl.Callback):
    """What an exporter placed before the distillation callback sees when fit ends."""

    def on_fit_end(self, trainer, pl_module):
        import pickle

        self.hooks = len(pl_module.model._forward_hooks)
        self.pickled = len(pickle.dumps(pl_module.model))  # MobileExport's round-robin ranking pickles it


def test_beside_structured_pruning_the_teacher_stays_the_unpruned_model(tmp_path, lit_model):
    kd = KnowledgeDistillation(alpha=0.5, tau=2.0)
    snap, end = _Snapshot(), _AtFitEnd()
    pruning = StructuredPruning(
        importance="taylor",
        pruning_ratio=0.5,
        iterative_steps=2,
        accumulate_batches=1,
        interval="step",
        start=1,
        frequency=2,
    )
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, [snap, end, pruning, kd], max_epochs=1, logger=logger, log_every_n_steps=1)
    trainer.fit(lit_model, random_loader(128, 16))
    assert len(pruning.events) == 2 and lit_model.model.patch_embed.proj.out_channels == 32
    # the capturing hook lives inside training_step only: at fit end the network is plain and picklable
    assert end.hooks == 0 and end.pickled > 0
    teacher = kd.teacher.state_dict()
    assert {k: v.shape for k, v in teacher.items()} == {k: v.shape for k, v in snap.weights.items()}
    assert all(torch.equal(teacher[k], v) for k, v in snap.weights.items())  # never trained, never pruned
    assert not kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())
    assert "training_step" not in lit_model.__dict__ and not lit_model.model._forward_hooks  # all removed
    with open(logger.experiment.metrics_file_path) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("distill/kd_loss")]
    assert len(rows) == 8
    assert all(float(r["distill/kd_loss"]) >= 0 and 0 <= float(r["distill/teacher_agreement"]) <= 1 for r in rows)
    assert float(rows[0]["distill/teacher_agreement"]) == 1.0  # step 0: the student is the teacher


def _fit(tmp_path, callbacks, label_seed=0, **kw):
    from torch.utils.data import DataLoader, TensorDataset

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier("vit_test_tiny", lr=1e-3)
    x = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(label_seed))
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, gradient_clip_val=1.0, **kw)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    return model.state_dict()


def _same(a, b, atol=1e-6):
    return all(torch.allclose(a[k], v, rtol=0, atol=atol) for k, v in b.items())


@pytest.mark.parametrize("accumulate", [pytest.param(1, marks=pytest.mark.slow), 2])  # fast tier <= 5 min
def test_the_combined_loss_goes_through_lightning(tmp_path, accumulate):
    plain = _fit(tmp_path / "a", [], accumulate_grad_batches=accumulate)
    # alpha=0: exactly the user's loss, scaled for accumulation and clipped by Lightning as before
    assert _same(_fit(tmp_path / "b", [KnowledgeDistillation(alpha=0.0)], accumulate_grad_batches=accumulate), plain)
    # alpha=1: only the distillation term: the labels no longer matter, and training differs from plain
    kd = [KnowledgeDistillation(alpha=1.0, tau=2.0)]
    distilled = _fit(tmp_path / "c", kd, accumulate_grad_batches=accumulate)
    relabelled = _fit(
        tmp_path / "d", [KnowledgeDistillation(alpha=1.0, tau=2.0)], label_seed=1, accumulate_grad_batches=accumulate
    )
    assert _same(distilled, relabelled) and not _same(distilled, plain, atol=1e-4)


@pytest.mark.slow
def test_resume_rebuilds_the_teacher_and_matches_an_uninterrupted_run(tmp_path):
    def run(name, ckpt_path=None, stop=False):
        pl.seed_everything(0, verbose=False)
        model = ImageClassifier("vit_test_tiny", lr=1e-3)
        pruning = StructuredPruning(
            importance="taylor",
            pruning_ratio=0.5,
            iterative_steps=2,
            accumulate_batches=2,
            interval="step",
            start=2,
            frequency=8,
        )
        kd = KnowledgeDistillation(alpha=0.7, tau=2.0)
        extra = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)] if stop else []

        class Stop(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                trainer.should_stop = stop

        trainer = make_trainer(tmp_path / name, [pruning, kd, Stop(), *extra], max_epochs=3, enable_checkpointing=stop)
        trainer.fit(model, random_loader(128, 16), ckpt_path=ckpt_path)
        return model, kd

    reference, ref_kd = run("ref")
    _, first_kd = run("a", stop=True)  # stops after epoch 0: event 1 done, the student already pruned
    path = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    assert torch.load(path, weights_only=True)["callbacks"][first_kd.state_key]["teacher"] is not None
    resumed, kd = run("b", ckpt_path=str(path))
    for k, v in ref_kd.teacher.state_dict().items():
        assert torch.equal(kd.teacher.state_dict()[k], v)  # the unpruned teacher, not the pruned student
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-5)


def test_a_given_teacher_path_and_bad_input(tmp_path, lit_model):
    path = save_vit_checkpoint(tiny_vit(num_classes=10, embed_dim=32, depth=1, num_heads=2), tmp_path / "t.pt")
    kd = KnowledgeDistillation(alpha=0.5, teacher=str(path))
    make_trainer(tmp_path, [kd], max_epochs=1).fit(lit_model, random_loader(32, 16))
    assert kd.teacher.embed_dim == 32  # a smaller, different model can teach too
    for kwargs, message in [
        (dict(alpha=1.5), r"alpha=1.5 must be a finite number >= 0 and <= 1"),
        (dict(tau=0), r"tau=0 must be a finite number > 0"),
        (
            dict(teacher_precision="int4"),
            r"teacher_precision='int4'; allowed: \['fp32', 'bf16', 'fp16', 'int8-dynamic', 'auto'\]",
        ),
        (dict(teacher=str(tmp_path / "missing.pt")), r"missing.pt': no such checkpoint file"),
    ]:
        with pytest.raises(ConfigError, match=message):
            KnowledgeDistillation(**kwargs)
    other = save_vit_checkpoint(tiny_vit(num_classes=7), tmp_path / "seven.pt")
    trainer = make_trainer(tmp_path / "x", [KnowledgeDistillation(teacher=str(other))], max_epochs=1)
    # found by a dry forward when fit starts, before the first training step
    with pytest.raises(ConfigError, match=r"teacher: its output shape \(1, 7\) differs from the student's \(1, 10\)"):
        trainer.fit(ImageClassifier("vit_test_tiny"), random_loader(32, 16))
    assert trainer.global_step == 0
    trainer = make_trainer(tmp_path / "y", [KnowledgeDistillation(teacher_precision="fp16")], max_epochs=1)
    with pytest.raises(ConfigError, match="teacher_precision='fp16' needs a CUDA device"):
        trainer.fit(ImageClassifier("vit_test_tiny"), random_loader(32, 16))
