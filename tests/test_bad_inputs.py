"""Bad input, table-driven: every public entry point refuses it up front with a ConfigError (or
InputNotFoundError) that names the argument, before any training step or export work starts; the
``pqv`` command line answers with exit status 2 and one line on stderr."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pqv_lightning import KnowledgeDistillation, MobileExport, StructuredPruning, load_pruned_checkpoint
from pqv_lightning.apps.cli import main
from pqv_lightning.classifier import ImageClassifier
from pqv_lightning.errors import ConfigError
from pqv_lightning.export import MobileExportConfig, export_mobile
from pqv_lightning.pruning import PruningConfig, StructuredPruner, prune_once, ratio_for_budget

from conftest import make_trainer, random_loader, tiny_vit

NAN, INF = float("nan"), float("inf")


def _refused(call, argument: str):
    with pytest.raises(ConfigError) as info:
        call()
    assert argument in str(info.value), f"{argument!r} not named in: {info.value}"
    return info.value


# ------------------------------------------------------------------------------------- StructuredPruning
PRUNING_CASES = [
    ("importance", dict(importance="fisher")),
    ("importance", dict(importance=3)),
    ("pruning_ratio", dict(pruning_ratio=1.0)),
    ("pruning_ratio", dict(pruning_ratio=-0.1)),
    ("pruning_ratio", dict(pruning_ratio=NAN)),
    ("pruning_ratio", dict(pruning_ratio=INF)),
    ("pruning_ratio", dict(pruning_ratio="0.5")),
    ("pruning_ratio", dict(pruning_ratio=True)),
    ("iterative_steps", dict(iterative_steps=0)),
    ("iterative_steps", dict(iterative_steps=2.5)),
    ("iterative_steps", dict(iterative_steps=True)),
    ("accumulate_batches", dict(accumulate_batches=0)),
    ("accumulate_batches", dict(accumulate_batches=1.5)),
    ("interval", dict(interval="batch")),
    ("start", dict(start=-1)),
    ("frequency", dict(frequency=0)),
    ("prune_num_heads", dict(prune_num_heads="yes")),
    ("prune_head_dims", dict(prune_head_dims=1)),
    ("head_pruning_ratio", dict(head_pruning_ratio=1.5, prune_num_heads=True)),
    ("head_pruning_ratio", dict(head_pruning_ratio=NAN, prune_num_heads=True)),
    ("round_to", dict(round_to=0)),
    ("round_to", dict(round_to=8.0)),
    ("ignored_layers", dict(ignored_layers="head")),
    ("ignored_layers", dict(ignored_layers=[1, 2])),
    ("global_pruning", dict(global_pruning="no")),
    ("model_attr", dict(model_attr="model..x")),
    ("model_attr", dict(model_attr=5)),
    ("example_input_shape", dict(example_input_shape=[1, 32])),
    ("example_input_shape", dict(example_input_shape=[1, 0, 32])),
    ("example_input_shape", dict(example_input_shape="1,32,32")),
    ("seed", dict(seed=1.5)),
    ("ratio_schedule", dict(ratio_schedule="exp")),
    ("target_macs", dict(target_macs=0)),
    ("target_macs", dict(target_macs=NAN)),
    ("target_params", dict(target_params=-5)),
    ("target_params", dict(target_params=INF)),
    ("budget", dict(target_macs=0.5, target_params=0.5)),
    ("pruning_ratio", dict(target_macs=0.5, pruning_ratio=0.3)),
    ("regularization", dict(regularization="l3")),
    ("reg_strength", dict(regularization="l2", reg_strength=-1)),
    ("reg_strength", dict(regularization="l2", reg_strength=NAN)),
    ("reg_strength_end", dict(regularization="l2", reg_strength_end=NAN)),
    ("reg_strength_end", dict(reg_strength_end=1e-3)),
    ("reg_alpha", dict(regularization="l2", reg_alpha=0.5)),
    ("threshold", dict(threshold=1.5)),
    ("threshold", dict(threshold=NAN)),
    ("reconstruct", dict(reconstruct="yes")),
    ("reconstruct_layers", dict(reconstruct_layers="qkv")),
    ("reconstruct_samples", dict(reconstruct_samples=0)),
    ("reconstruct_ridge", dict(reconstruct_ridge=-1.0)),
    ("reconstruct_ridge", dict(reconstruct_ridge=INF)),
    ("widths_for", dict(widths_for="tflite")),
    ("frequency", dict(interval="step", frequency=2, accumulate_batches=4)),
]


@pytest.mark.parametrize("argument, kwargs", PRUNING_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(PRUNING_CASES)])
def test_structured_pruning_refuses(argument, kwargs):
    _refused(lambda: StructuredPruning(**kwargs), argument)


# ------------------------------------------------------------------------------------- KnowledgeDistillation
KD_CASES = [
    ("tau", dict(tau=NAN)),
    ("tau", dict(tau=INF)),
    ("tau", dict(tau=0)),
    ("tau", dict(tau=-1.0)),
    ("tau", dict(tau="2")),
    ("alpha", dict(alpha=NAN)),
    ("alpha", dict(alpha=1.5)),
    ("alpha", dict(alpha=-0.1)),
    ("alpha", dict(alpha=True)),
    ("teacher_precision", dict(teacher_precision="int4")),
    ("teacher", dict(teacher=42)),
    ("teacher", dict(teacher="/nonexistent/teacher.pt")),
    ("hard_labels", dict(hard_labels="yes")),
    ("store_teacher", dict(store_teacher=0)),
    ("model_attr", dict(model_attr="a b")),
]


@pytest.mark.parametrize("argument, kwargs", KD_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(KD_CASES)])
def test_distillation_refuses(argument, kwargs):
    _refused(lambda: KnowledgeDistillation(**kwargs), argument)


# ------------------------------------------------------------------------------------- MobileExport
EXPORT_CASES = [
    ("precisions", dict(precisions=[])),
    ("precisions", dict(precisions="fp32")),
    ("precisions", dict(precisions=["int3"])),
    ("precisions", dict(precisions=["fp32", "fp32"])),
    ("precisions", dict(precisions=[None])),
    ("formats", dict(formats=[])),
    ("formats", dict(formats="ptl")),
    ("formats", dict(formats=["tflite"])),
    ("engines", dict(engines=[])),
    ("engines", dict(engines=["tensorrt"])),
    ("engines", dict(engines="x86")),
    ("output_dir", dict(output_dir="")),
    ("output_dir", dict(output_dir="   ")),
    ("delegation_friendly", dict(delegation_friendly="yes")),
    ("pad_widths", dict(pad_widths=1)),
    ("pad_widths", dict(pad_widths="64")),
    ("overwrite", dict(overwrite=1)),
    ("min_top1_agreement", dict(min_top1_agreement=NAN)),
    ("min_top1_agreement", dict(min_top1_agreement=1.5)),
    ("on_failure", dict(on_failure="ignore")),
    ("verify_batches", dict(verify_batches=0)),
    ("calibration_batches", dict(calibration_batches=-1)),
    ("calibration_loader", dict(calibration_loader="test")),
    ("threads", dict(threads=0)),
    ("threads", dict(threads=NAN)),
    ("threads", dict(threads=2.0)),
    ("warmup", dict(warmup=-1)),
    ("repeats", dict(repeats=0)),
    ("run_on", dict(run_on=[])),
    ("run_on", dict(run_on=["predict"])),
    ("run_on", dict(run_on="fit")),
    ("model_attr", dict(model_attr="1model")),
    ("example_input_shape", dict(example_input_shape=[3, 224])),
    ("example_input_shape", dict(example_input_shape=[3, -1, 224])),
    ("input_normalization", dict(input_normalization=[0.5, 0.5])),
    ("log_artifact", dict(log_artifact="no")),
    ("measure_memory", dict(measure_memory=None)),
    ("rank", dict(rank="fastest")),
    ("rank_rounds", dict(rank_rounds=0)),
    ("rank_calls", dict(rank_calls=0.5)),
]


@pytest.mark.parametrize("argument, kwargs", EXPORT_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(EXPORT_CASES)])
def test_mobile_export_refuses(argument, kwargs):
    _refused(lambda: MobileExport(**kwargs), argument)


# ------------------------------------------------------------------------------------- configs and pure functions
CONFIG_CASES = [
    ("importance", dict(importance="snip")),
    ("pruning_ratio", dict(pruning_ratio=NAN)),
    ("pruning_ratio", dict(pruning_ratio=1)),
    ("iterative_steps", dict(iterative_steps=-2)),
    ("round_to", dict(round_to=-8)),
    ("ratio_schedule", dict(ratio_schedule="log")),
    ("threshold", dict(threshold=0.0)),
    ("reconstruct_layers", dict(reconstruct_layers="none")),
    ("reconstruct_ridge", dict(reconstruct_ridge=NAN)),
    ("ignored_layers", dict(ignored_layers="blocks.0")),
    ("seed", dict(seed="0")),
]


@pytest.mark.parametrize("argument, kwargs", CONFIG_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CONFIG_CASES)])
def test_prune_once_refuses_before_touching_the_model(argument, kwargs):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _refused(lambda: prune_once(model, PruningConfig(**kwargs)), argument)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _model_cases():
    return [
        ("model", lambda: prune_once(None, PruningConfig(importance="l2"))),
        ("model", lambda: prune_once("vit_tiny", PruningConfig(importance="l2"))),
        ("config", lambda: prune_once(tiny_vit(), {"pruning_ratio": 0.5})),
        ("budget", lambda: prune_once(tiny_vit(), PruningConfig(importance="l2", target_macs=0.5, target_params=0.5))),
        (
            "pruning_ratio",
            lambda: prune_once(tiny_vit(), PruningConfig(importance="l2", pruning_ratio=0.3, target_macs=0.5)),
        ),
        ("target_macs", lambda: prune_once(tiny_vit(), PruningConfig(importance="l2", target_macs=NAN))),
        ("target_params", lambda: prune_once(tiny_vit(), PruningConfig(importance="l2", target_params="half"))),
        ("calibrate", lambda: prune_once(tiny_vit(), PruningConfig(importance="taylor"), calibrate=3)),
        (
            "example_inputs",
            lambda: prune_once(tiny_vit(), PruningConfig(importance="l2"), example_inputs=torch.randn(1, 3, 32, 32)),
        ),
        (
            "example_inputs",
            lambda: prune_once(tiny_vit(), PruningConfig(importance="l2"), example_inputs=torch.randn(0, 1, 32, 32)),
        ),
        (
            "example_inputs",
            lambda: prune_once(tiny_vit(), PruningConfig(importance="l2"), example_inputs=[[0.0] * 32] * 32),
        ),
        (
            "example_inputs",
            lambda: prune_once(
                tiny_vit(), PruningConfig(importance="l2"), example_inputs=torch.full((1, 1, 32, 32), NAN)
            ),
        ),
        ("round_to", lambda: prune_once(tiny_vit(), PruningConfig(importance="l2", round_to=512))),
        ("head_pruning_ratio", lambda: prune_once(tiny_vit(), PruningConfig(importance="l2", head_pruning_ratio=0.5))),
        (
            "prune_num_heads",
            lambda: prune_once(
                tiny_vit(num_heads=1), PruningConfig(importance="l2", prune_num_heads=True, prune_head_dims=False)
            ),
        ),
        ("ignored_layers", lambda: prune_once(tiny_vit(), PruningConfig(importance="l2", ignored_layers=["nope"]))),
        ("target_macs", lambda: ratio_for_budget(tiny_vit(), PruningConfig(importance="l2"), target_macs=2.0e12)),
        ("target_macs", lambda: ratio_for_budget(tiny_vit(), PruningConfig(importance="l2"))),
        ("model", lambda: StructuredPruner(torch.nn.Linear(4, 4).state_dict(), PruningConfig())),
    ]


@pytest.mark.parametrize("case", range(len(_model_cases())))
def test_pure_pruning_functions_refuse(case):
    argument, call = _model_cases()[case]
    _refused(call, argument)


def _export_cases(tmp_path):
    model, example = tiny_vit(), torch.randn(1, 1, 32, 32)

    def cfg(**kw):
        return MobileExportConfig(
            **{
                "precisions": ["fp32"],
                "formats": ["ptl"],
                "output_dir": str(tmp_path / "out"),
                "measure_memory": False,
                "rank": "none",
                **kw,
            }
        )

    return [
        ("model", lambda: export_mobile(None, example, cfg())),
        ("model", lambda: export_mobile(model.state_dict(), example, cfg())),
        ("example_input", lambda: export_mobile(model, [[0.0]], cfg())),
        ("example_input", lambda: export_mobile(model, torch.randn(0, 1, 32, 32), cfg())),
        ("example_input", lambda: export_mobile(model, torch.randn(1, 3, 32, 32), cfg())),
        ("example_input", lambda: export_mobile(model, torch.randn(1, 1, 48, 40), cfg())),
        ("example_input", lambda: export_mobile(model, torch.full((1, 1, 32, 32), INF), cfg())),
        ("config", lambda: export_mobile(model, example, {"precisions": ["fp32"]})),
        ("threads", lambda: export_mobile(model, example, cfg(threads=NAN))),
        ("threads", lambda: export_mobile(model, example, cfg(threads=0))),
        ("repeats", lambda: export_mobile(model, example, cfg(repeats=2.5))),
        ("precisions", lambda: export_mobile(model, example, cfg(precisions="fp32"))),
        ("precisions", lambda: export_mobile(model, example, cfg(precisions=[]))),
        ("formats", lambda: export_mobile(model, example, cfg(formats=[]))),
        ("output_dir", lambda: export_mobile(model, example, cfg(output_dir=""))),
        ("output_dir", lambda: export_mobile(model, example, cfg(output_dir="/proc/version/out"))),
        ("output_dir", lambda: export_mobile(model, example, cfg(output_dir="/proc/pqv-cannot-create"))),
        ("input_normalization", lambda: export_mobile(model, example, cfg(), input_normalization="0.5")),
        ("calibration_data", lambda: export_mobile(model, example, cfg(precisions=["int8-static"]))),
    ]


@pytest.mark.parametrize("case", range(19))
def test_export_mobile_refuses_before_writing(tmp_path, case):
    argument, call = _export_cases(tmp_path)[case]
    _refused(call, argument)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_cases_table_is_complete(tmp_path):
    assert len(_export_cases(tmp_path)) == 19


# ------------------------------------------------------------------------------------- checkpoints
def _checkpoint_cases(tmp_path):
    rnd = tmp_path / "random.ckpt"
    rnd.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    plain = tmp_path / "plain.ckpt"
    torch.save(ImageClassifier("vit_test_tiny").state_dict(), plain)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    return [
        ("checkpoint_path", lambda: load_pruned_checkpoint(ImageClassifier, rnd)),
        ("checkpoint_path", lambda: load_pruned_checkpoint(ImageClassifier, empty)),
        ("checkpoint_path", lambda: load_pruned_checkpoint(ImageClassifier, plain)),
        ("checkpoint_path", lambda: load_pruned_checkpoint(ImageClassifier, text)),
        ("checkpoint_path", lambda: load_pruned_checkpoint(ImageClassifier, tmp_path / "missing.ckpt")),
        ("checkpoint_path", lambda: load_pruned_checkpoint(ImageClassifier, None)),
        ("module_class", lambda: load_pruned_checkpoint(ImageClassifier("vit_test_tiny"), plain)),
        ("module_class", lambda: load_pruned_checkpoint(torch.nn.Linear, plain)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_load_pruned_checkpoint_refuses(tmp_path, case):
    argument, call = _checkpoint_cases(tmp_path)[case]
    _refused(call, argument)


def test_load_pruned_checkpoint_of_another_width(tmp_path):
    """A full Lightning checkpoint of a wider model: one error naming the shapes, not a wall."""
    trainer = make_trainer(tmp_path, [], max_epochs=1, limit_train_batches=1)
    wide = ImageClassifier("vit_test_tiny")
    trainer.fit(wide, random_loader(16, 16))
    trainer.save_checkpoint(tmp_path / "wide.ckpt")
    ckpt = torch.load(tmp_path / "wide.ckpt", weights_only=False)
    ckpt["state_dict"] = {
        k: torch.cat([v, v], dim=-1) if v.dim() and "blocks.0.mlp" in k else v for k, v in ckpt["state_dict"].items()
    }
    torch.save(ckpt, tmp_path / "other.ckpt")
    error = _refused(lambda: load_pruned_checkpoint(ImageClassifier, tmp_path / "other.ckpt"), "shapes")
    assert len(str(error).splitlines()) == 1


# ------------------------------------------------------------------------------------- refused at setup
class CountingClassifier(ImageClassifier):
    """Counts training steps: a refusal at setup must come before the first."""

    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def _setup_cases(tmp_path):
    wrong_teacher = tiny_vit(in_chans=3)
    return [
        (
            "example_input_shape",
            lambda: [MobileExport(output_dir=str(tmp_path / "o1"), example_input_shape=[3, 32, 32])],
        ),
        (
            "example_input_shape",
            lambda: [MobileExport(output_dir=str(tmp_path / "o2"), example_input_shape=[1, 30, 30])],
        ),
        ("output_dir", lambda: [MobileExport(output_dir="/proc/version/export")]),
        ("output_dir", lambda: [MobileExport(output_dir="/proc/pqv-export")]),
        (
            "example_input_shape",
            lambda: [StructuredPruning(importance="l2", iterative_steps=1, example_input_shape=[3, 32, 32])],
        ),
        ("round_to", lambda: [StructuredPruning(importance="l2", iterative_steps=1, round_to=1024)]),
        (
            "ignored_layers",
            lambda: [StructuredPruning(importance="l2", iterative_steps=1, ignored_layers=["head", "blocks.9.attn"])],
        ),
        ("teacher", lambda: [KnowledgeDistillation(teacher=wrong_teacher)]),
        ("model_attr", lambda: [StructuredPruning(importance="l2", iterative_steps=1, model_attr="missing")]),
        ("model_attr", lambda: [MobileExport(output_dir=str(tmp_path / "o3"), model_attr="model.head")]),
    ]


@pytest.mark.parametrize("case", range(10))
def test_callbacks_refuse_at_setup_before_any_step(tmp_path, case):
    argument, callbacks = _setup_cases(tmp_path)[case]
    CountingClassifier.steps = 0
    trainer = make_trainer(tmp_path, callbacks(), max_epochs=1, limit_train_batches=2)
    _refused(lambda: trainer.fit(CountingClassifier("vit_test_tiny"), random_loader(32, 16)), argument)
    assert CountingClassifier.steps == 0
    assert not any(p.name.startswith(".pqv-write-probe") for p in Path(tmp_path).rglob("*"))


# ------------------------------------------------------------------------------------- command line
CLI_CASES = [
    ["demo", "--ratio", "abc"],
    ["demo", "--ratio", "1.5"],
    ["demo", "--ratio", "nan"],
    ["demo", "--test-subset", "0"],
    ["demo", "--epochs", "0"],
    ["demo", "--threads", "0"],
    ["demo", "--batch-size", "-1"],
    ["demo", "--importance", "fisher"],
    ["demo", "--recipe", "nope"],
    ["demo", "--formats", "tflite"],
    ["demo", "--precisions", "int3"],
    ["demo", "--widths-for", "coreml"],
    ["demo", "--schedule", "exp"],
    ["demo", "--checkpoint", "/nonexistent.pt"],
    ["demo", "--checkpoint", "{tmp}/binary.yaml"],
    ["demo", "--checkpoint", "{tmp}/plain.pt"],
    ["demo", "--data-dir", "/nonexistent"],
    ["demo", "--export-dir", "/proc/version"],
    ["demo", "--plots-dir", "/proc/version/plots"],
    ["demo", "--no-such-option"],
    ["bench"],
    ["bench", "--shape", "abc", "x.pte"],
    ["bench", "--shape", "1,0,32,32", "x.pte"],
    ["bench", "--rounds", "0", "x.pte"],
    ["bench", "--calls", "x", "x.pte"],
    ["bench", "--threads", "0", "x.pte"],
    ["bench", "--max-contention", "lots", "x.pte"],
    ["bench", "/nonexistent/model.pte"],
    ["bench", "--json", "/nonexistent/dir/out.json", "x.pte"],
    ["sweep", "--threads", "0", "--report-only", "--out", "{tmp}/sweep"],
    ["sweep", "--experiments", "nope"],
    ["sweep", "--formats", "tflite"],
    ["sweep", "--data-dir", "/nonexistent"],
    ["fit", "--config", "{tmp}/missing.yaml"],
    ["fit", "--config", "{tmp}/binary.yaml"],
    ["fit", "--config", "{tmp}/broken.yaml"],
    ["fit", "--trainer.max_epochs", "abc"],
    ["fit", "--config", "{tmp}/kd_nan.yaml"],
    ["fit", "--config", "{tmp}/export_empty.yaml"],
    ["sweep", "--out", "/proc/version/sweep", "--experiments", "gemm"],
    ["nosuchcommand"],
    [],
]


@pytest.mark.parametrize("argv", CLI_CASES, ids=[" ".join(a) or "<none>" for a in CLI_CASES])
def test_cli_exit_2_with_one_line(tmp_path, capsys, argv):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp_path / "broken.yaml").write_text("trainer:\n  max_epochs: [\n")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    for name, callback in (
        ("kd_nan", "pqv_lightning.KnowledgeDistillation\n      init_args: {tau: .nan}"),
        ("export_empty", "pqv_lightning.MobileExport\n      init_args: {precisions: []}"),
    ):
        (tmp_path / f"{name}.yaml").write_text(
            "trainer:\n  max_epochs: 1\n  callbacks:\n    - class_path: "
            + callback
            + "\nmodel:\n  model_name: vit_test_tiny\n"
            + "data:\n  class_path: pqv_lightning.data.FashionMNISTDataModule\n"
        )
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exits
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("pqv: error:"), err


def test_every_table_has_150_cases_or_more(tmp_path):
    total = (
        len(PRUNING_CASES)
        + len(KD_CASES)
        + len(EXPORT_CASES)
        + len(CONFIG_CASES)
        + len(_model_cases())
        + len(_export_cases(tmp_path))
        + len(_checkpoint_cases(tmp_path))
        + 1
        + len(_setup_cases(tmp_path))
        + len(CLI_CASES)
    )
    assert total >= 150, total


def test_nan_tau_never_reaches_training(tmp_path):
    """The original report: tau=nan trained on and turned every weight into NaN."""
    with pytest.raises(ConfigError, match="tau=nan"):
        KnowledgeDistillation(tau=math.nan)


def test_pl_module_network_in_eval_mode_reconstructs(tmp_path):
    """A network the user put in eval mode before fit (a pretrained model): reconstruction collects its
    inputs anyway (before: 'pass calibration input batches' at the first event)."""
    lit = ImageClassifier("vit_test_tiny")
    lit.model.eval()
    pruning = StructuredPruning(
        importance="l2",
        pruning_ratio=0.25,
        iterative_steps=1,
        accumulate_batches=2,
        interval="step",
        frequency=2,
        reconstruct=True,
        reconstruct_samples=32,
    )
    make_trainer(tmp_path, [pruning], max_epochs=1, limit_train_batches=4).fit(lit, random_loader(64, 16))
    (event,) = pruning.events
    assert (
        event.reconstruction_error_after is not None
        and event.reconstruction_error_after < event.reconstruction_error_before
    )


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["fit", "--config", "{tmp}/kd_nan.yaml"], marks=pytest.mark.slow),  # fast tier <= 5 min: trains
        ["bench", "--shape", "abc", "x.pte"],
    ],
)
def test_cli_one_line_in_a_real_process(tmp_path, argv):
    """What a user's terminal shows (no capture in between: Lightning's own log lines would show here)."""
    import subprocess
    import sys

    (tmp_path / "kd_nan.yaml").write_text(
        "trainer:\n  max_epochs: 1\n  callbacks:\n    - class_path: pqv_lightning.KnowledgeDistillation\n"
        "      init_args: {tau: .nan}\nmodel:\n  model_name: vit_test_tiny\n"
    )
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run(
        [sys.executable, "-m", "pqv_lightning", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("pqv: error:"), done.stderr
