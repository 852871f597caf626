"""One source of truth per option: every callback option's default and allowed values are its config's
(PruningConfig, EventSchedule, GroupSparsity, MobileExportConfig, DistillationConfig,
QuantizationAwareTrainingConfig), every config option
is reachable from its callback, and a `pqv fit` YAML accepts each option with a non-default value."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from pqv_lightning import KnowledgeDistillation, MobileExport, QuantizationAwareTraining, StructuredPruning
from pqv_lightning.callbacks.structured_pruning import ITERATIVE_STEPS
from pqv_lightning.distillation import TEACHER_PRECISIONS, DistillationConfig
from pqv_lightning.export import ENGINES, RANKINGS, MobileExportConfig
from pqv_lightning.export.core import ON_FAILURE
from pqv_lightning.export.qat import QuantizationAwareTrainingConfig
from pqv_lightning.latency_budget import ALLOCATIONS
from pqv_lightning.pruning import EventSchedule, PruningConfig
from pqv_lightning.pruning.config import RATIO_SCHEDULES, RECONSTRUCT_LAYERS
from pqv_lightning.pruning.schedule import INTERVALS
from pqv_lightning.pruning.sparsity import SPARSITY_NORMS, GroupSparsity

#: callback -> (the config classes its options come from, {option: the default it keeps on purpose})
SOURCES = {
    StructuredPruning: ((PruningConfig, EventSchedule), {"iterative_steps": ITERATIVE_STEPS}),
    MobileExport: ((MobileExportConfig,), {"precisions": None, "formats": None, "output_dir": None}),
    KnowledgeDistillation: ((DistillationConfig,), {}),
    QuantizationAwareTraining: ((QuantizationAwareTrainingConfig,), {}),
}
#: callback option -> what its config allows
ALLOWED = {
    (StructuredPruning, "ratio_schedule"): tuple(RATIO_SCHEDULES),
    (StructuredPruning, "reconstruct_layers"): tuple(RECONSTRUCT_LAYERS),
    (StructuredPruning, "interval"): INTERVALS,
    (StructuredPruning, "regularization"): tuple(SPARSITY_NORMS),
    (StructuredPruning, "latency_allocation"): tuple(ALLOCATIONS),
    (MobileExport, "engines"): ENGINES,
    (MobileExport, "on_failure"): ON_FAILURE,
    (MobileExport, "rank"): RANKINGS,
    (KnowledgeDistillation, "teacher_precision"): TEACHER_PRECISIONS,
}


def _fields(config: type) -> dict[str, object]:
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        for f in dataclasses.fields(config)
    }


def _literal_values(annotation: object) -> tuple:
    """The strings of every Literal inside an annotation (``list[Literal[...]] | None`` included)."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(a for a in typing.get_args(annotation) if isinstance(a, str))
    return tuple(v for arg in typing.get_args(annotation) for v in _literal_values(arg))


def drifted(callback: type, configs: tuple[type, ...], kept: dict[str, object]) -> list[str]:
    """The config options a callback cannot set, or whose default there differs from the config's."""
    params = inspect.signature(callback.__init__).parameters
    found = []
    for config in configs:
        for name, default in _fields(config).items():
            if name not in params:
                found.append(f"{config.__name__}.{name} cannot be set on {callback.__name__}")
            elif params[name].default != kept.get(name, default):
                found.append(f"{callback.__name__}({name}={params[name].default!r}), {config.__name__}: {default!r}")
    return found


@pytest.mark.parametrize("callback", list(SOURCES), ids=lambda c: c.__name__)
def test_callback_defaults_are_their_configs(callback):
    assert drifted(callback, *SOURCES[callback]) == []
    if callback is StructuredPruning:  # the sparsity penalty's own defaults
        params = inspect.signature(callback.__init__).parameters
        assert (params["reg_strength"].default, params["reg_alpha"].default) == (
            GroupSparsity.strength,
            GroupSparsity.alpha,
        )


def test_the_check_finds_a_drifted_default_and_a_missing_option():
    class Drifted(KnowledgeDistillation):
        def __init__(
            self, alpha: float = 0.7, teacher_precision: str = "fp32", hard_labels: bool = False, tau: float = 1.0
        ) -> None:
            super().__init__(alpha=alpha, tau=tau, teacher_precision=teacher_precision, hard_labels=hard_labels)

    @dataclasses.dataclass(frozen=True)
    class Wider(DistillationConfig):
        beta: float = 0.0

    assert drifted(Drifted, (Wider,), {}) == ["Drifted(alpha=0.7), Wider: 0.5", "Wider.beta cannot be set on Drifted"]


@pytest.mark.parametrize("callback, option", list(ALLOWED), ids=lambda v: getattr(v, "__name__", v))
def test_callback_choices_are_their_configs(callback, option):
    hints = typing.get_type_hints(callback.__init__)
    assert _literal_values(hints[option]) == tuple(ALLOWED[callback, option])


#: a non-default, valid value of every option of a callback, as YAML would give it (options that exclude
#: each other, a ratio and a budget, in separate YAML files)
NON_DEFAULT = {
    StructuredPruning: dict(
        importance="l2",
        pruning_ratio=0.5,
        iterative_steps=2,
        accumulate_batches=2,
        interval="step",
        start=1,
        frequency=3,
        prune_num_heads=True,
        head_pruning_ratio=0.25,
        prune_head_dims=False,
        round_to=4,
        ignored_layers=["head"],
        global_pruning=True,
        model_attr="model",
        example_input_shape=[1, 32, 32],
        seed=3,
        ratio_schedule="cubic",
        regularization="l1",
        reg_strength=0.01,
        reg_strength_end=0.02,
        reg_alpha=2.0,
        threshold=0.05,
        reconstruct=True,
        reconstruct_layers="residual",
        reconstruct_samples=16,
        reconstruct_ridge=0.01,
        widths_for="openvino",
    ),
    (StructuredPruning, "macs"): dict(target_macs=0.5),
    (StructuredPruning, "params"): dict(target_params=1000),
    (StructuredPruning, "latency"): dict(
        target_latency=0.5, widths_for="onnx", latency_precision="int8-dynamic", latency_allocation="global"
    ),
    (StructuredPruning, "widths"): dict(group_widths={"blocks.0.mlp.fc1:out": 64}),
    MobileExport: dict(
        precisions=["fp32", "int8-static"],
        formats=["ptl"],
        engines=["qnnpack"],
        delegation_friendly=False,
        pad_widths=8,
        output_dir="out",
        overwrite=True,
        min_top1_agreement=0.5,
        on_failure="raise",
        verify_batches=2,
        calibration_batches=3,
        calibration_loader="train",
        threads=1,
        warmup=1,
        repeats=2,
        run_on=["fit", "test"],
        model_attr="model",
        example_input_shape=[1, 32, 32],
        input_normalization={"mean": [0.5], "std": [0.25]},
        log_artifact=False,
        measure_memory=False,
        jobs=2,
        rank="in-process",
        rank_rounds=2,
        rank_calls=4,
    ),
    KnowledgeDistillation: dict(
        alpha=0.25, tau=2.0, teacher_precision="bf16", hard_labels=True, model_attr="model", store_teacher=False
    ),
    QuantizationAwareTraining: dict(
        scheme="int8-dynamic-int8-weight", start_step=3, activation_delay_steps=2, model_attr="model"
    ),
    (QuantizationAwareTraining, "epoch"): dict(start_epoch=1),
}


def _settings(callback_obj) -> dict[str, object]:
    """Where each callback keeps an option once built (its config or itself)."""
    found: dict[str, object] = {}
    for holder in (
        callback_obj,
        getattr(callback_obj, "config", None),
        getattr(callback_obj, "schedule", None),
        getattr(callback_obj, "regularization", None),
    ):
        if holder is not None:
            found.update({k: v for k, v in vars(holder).items() if not k.startswith("_")})
    reg = getattr(callback_obj, "regularization", None)
    if reg is not None:
        found.update(regularization=reg.norm, reg_strength=reg.strength, reg_alpha=reg.alpha)
    return found


@pytest.mark.parametrize("callback", list(SOURCES), ids=lambda c: c.__name__)
def test_the_yaml_cases_set_every_option(callback):
    params = {p for p in inspect.signature(callback.__init__).parameters if p not in ("self", "teacher")}
    given = {
        name
        for key, options in NON_DEFAULT.items()
        if key == callback or (isinstance(key, tuple) and key[0] is callback)
        for name in options
    }
    assert given == params


@pytest.mark.parametrize(
    "key",
    list(NON_DEFAULT),
    ids=lambda k: "-".join(getattr(p, "__name__", p) for p in (k if isinstance(k, tuple) else (k,))),
)
def test_every_option_is_accepted_by_pqv_fit_yaml(key, tmp_path, monkeypatch):
    import yaml

    from pqv_lightning.apps.lightning_cli import run_cli

    callback = key[0] if isinstance(key, tuple) else key
    options = NON_DEFAULT[key]
    monkeypatch.chdir(tmp_path)
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 8,
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": f"pqv_lightning.{callback.__name__}", "init_args": options}],
        },
        "model": {"model_name": "vit_test_tiny"},
        "data": {"class_path": "pqv_lightning.data.FashionMNISTDataModule"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cli = run_cli(["--config", str(tmp_path / "c.yaml")], run=False)
    (built,) = [c for c in cli.trainer.callbacks if isinstance(c, callback)]
    settings = _settings(built)
    for name, value in options.items():
        if name in settings:
            assert (
                settings[name] == value
                or settings[name] == tuple(value)
                or (name == "output_dir" and str(settings[name]).endswith(value))
            ), (name, settings[name], value)
    if key is StructuredPruning:
        assert (built.config.prune_num_heads, built.config.prune_head_dims, built.widths_for) == (
            True,
            False,
            "openvino",
        )
