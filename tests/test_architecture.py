"""The layout and the extension points: no import circles, one-way layers, registries that agree
with every list of allowed values, and the examples of docs/architecture.md (run here)."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from pqv_lightning.errors import ConfigError
from pqv_lightning.export import PRECISIONS, TARGETS, MobileExportConfig
from pqv_lightning.export.delegation import DELEGATION_SWAPS
from pqv_lightning.models import MODELS
from pqv_lightning.pruning.adapters import ADAPTERS
from pqv_lightning.pruning.importance import IMPORTANCE
from pqv_lightning.registry import Registry, UnknownNameError

from _imports import PACKAGE, ROOT, cycles, import_graph, module_name

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
REGISTRIES = {
    "IMPORTANCE": IMPORTANCE,
    "MODELS": MODELS,
    "ADAPTERS": ADAPTERS,
    "TARGETS": TARGETS,
    "PRECISIONS": PRECISIONS,
    "DELEGATION_SWAPS": DELEGATION_SWAPS,
}


# ---------------------------------------------------------------------------------------------- layout
def test_the_package_has_no_import_circles():
    graph = import_graph()
    assert len(graph) > 30  # the graph really was read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: every module of the package, by layer (a module missing here fails the layout test: place it)
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": (
        "_lazy",
        "_version",
        "errors",
        "checks",
        "registry",
        "fileio",
        "settings",
        "widths",
        "outputs",
        "progress",
        "hostcpu",
        "workers",
    ),
    "library": ("pruning", "export", "distillation", "models"),
    "workflows": ("compress", "latency_budget"),
    "lightning": ("callbacks", "classifier", "data"),
    "apps": ("apps", "__main__"),
}
ORDER = list(LAYERS)


def layer_of(module: str) -> str | None:
    """The layer of a module (``pqv_lightning.pruning.pruner`` -> "library"); None for the root package
    (its names load lazily, from every layer) and for a module no layer lists."""
    if module == PACKAGE:
        return None
    top = module.removeprefix(PACKAGE + ".").split(".")[0]
    return next((layer for layer, tops in LAYERS.items() if top in tops), None)


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if m != PACKAGE and layer_of(m) is None]
    assert unplaced == []


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point up a layer, or between the two library packages (pruning and export share
    only what lies below both: ``widths``)."""
    found = []
    for mod, deps in graph.items():
        here = layer_of(mod)
        for dep in deps:
            there = layer_of(dep)
            if here is None or there is None:
                continue
            if ORDER.index(there) > ORDER.index(here):
                found.append(f"{mod} ({here}) imports {dep} ({there})")
            tops = {x.removeprefix(PACKAGE + ".").split(".")[0] for x in (mod, dep)}
            if tops == {"pruning", "export"}:
                found.append(f"{mod} imports {dep}: pruning and export do not import each other")
    return found


def test_layers_point_one_way_and_pruning_and_export_stay_apart():
    assert layer_violations(import_graph()) == []


def test_the_layer_check_finds_what_the_old_tree_had():
    """The 0.1 tree's walls that leaked: the pruner read export's targets, padding read the pruner,
    models.py (library) held the LightningModule."""
    old = {
        f"{PACKAGE}.pruning.pruner": {f"{PACKAGE}.export.targets"},
        f"{PACKAGE}.export.padding": {f"{PACKAGE}.pruning.pruner"},
        f"{PACKAGE}.models": {f"{PACKAGE}.callbacks.structured_pruning"},
        f"{PACKAGE}.widths": set(),
    }
    assert layer_violations(old) == [
        f"{PACKAGE}.pruning.pruner imports {PACKAGE}.export.targets: pruning and export do not import each other",
        f"{PACKAGE}.export.padding imports {PACKAGE}.pruning.pruner: pruning and export do not import each other",
        f"{PACKAGE}.models (library) imports {PACKAGE}.callbacks.structured_pruning (lightning)",
    ]
    assert lightning_imports({"models.py": "import torch\nimport lightning.pytorch as pl\n"}) == ["models.py"]


def lightning_imports(sources: dict[str, str]) -> list[str]:
    """The sources (name -> text) that import Lightning at any level (function-level imports too)."""
    return [
        name
        for name, text in sources.items()
        if re.search(r"^\s*(import (lightning|pytorch_lightning)|from (lightning|pytorch_lightning)\b)", text, re.M)
    ]


def test_foundation_and_library_never_import_lightning():
    below = {str(p): p.read_text() for p in ROOT.rglob("*.py") if layer_of(module_name(p)) in ("foundation", "library")}
    assert len(below) > 30
    assert lightning_imports(below) == []


# ---------------------------------------------------------------------------------------------- registry
def test_registry_register_lookup_and_errors():
    reg: Registry = Registry("greeting", argument="style")
    reg.register("plain", str.lower)

    @reg.register("loud")
    def loud(s):
        return s.upper()

    assert reg["loud"] is loud and list(reg) == ["plain", "loud"] and reg.names() == ("plain", "loud")
    assert "plain" in reg and "soft" not in reg and 3 not in reg and len(reg) == 2
    with pytest.raises(UnknownNameError, match=r"style='soft' is not registered; allowed: \['plain', 'loud'\]"):
        reg["soft"]
    with pytest.raises(KeyError):  # a Mapping's contract, too
        reg["soft"]
    assert reg.get("soft") is None
    with pytest.raises(ConfigError, match="'plain' is already registered"):
        reg.register("plain", str.title)
    reg.register("plain", str.title, overwrite=True)
    assert reg["plain"] is str.title
    with pytest.raises(ConfigError, match=r"style=\['loud', 'x', 'y'\]: unknown \['x', 'y'\]"):
        reg.check(["loud", "x", "y"])
    with pytest.raises(ConfigError, match="empty"):
        reg.check([])
    reg.check("loud")
    assert reg.unregister("loud") is loud and "loud" not in reg
    with pytest.raises(TypeError, match="not keyed by type"):
        reg.for_type(1)


def test_registry_lookup_by_type_mro_and_exact():
    class Base: ...

    class Child(Base): ...

    class Grandchild(Child): ...

    by_mro: Registry = Registry("handler", types=lambda e: e[0])
    by_mro.register("base", ((Base,), "base"))
    by_mro.register("child", ((Child,), "child"))
    assert by_mro.for_type(Grandchild())[1] == "child" and by_mro.for_type(Base())[1] == "base"
    assert by_mro.for_type(1) is None
    exact: Registry = Registry("swap", types=lambda e: e[0], mro=False)
    exact.register("base", ((Base,), "base"))
    assert exact.for_type(Base())[1] == "base" and exact.for_type(Child()) is None


def test_registry_builtins_load_on_first_read_or_registration(tmp_path, monkeypatch):
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pqv_test_builtin_a.py").write_text(
        "from pqv_test_registry_home import REG\nclass A: ...\nREG.register('a', A)\nimport pqv_test_builtin_b\n"
    )
    (tmp_path / "pqv_test_builtin_b.py").write_text(
        "from pqv_test_registry_home import REG\nclass B: ...\nREG.register('b', B)\n"
    )
    home = type(sys)("pqv_test_registry_home")
    monkeypatch.setitem(sys.modules, "pqv_test_registry_home", home)
    for name in ("pqv_test_builtin_a", "pqv_test_builtin_b"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    home.REG = Registry("thing", builtins=("pqv_test_builtin_a", "pqv_test_builtin_b"))
    assert "pqv_test_builtin_a" not in sys.modules  # nothing imported yet
    home.REG.register("mine", 3)  # a registration loads the built-ins first: they keep their place
    assert home.REG.names() == ("a", "b", "mine") and home.REG["b"].__name__ == "B"
    with pytest.raises(ConfigError, match="'a' is already registered"):
        home.REG.register("a", 4)

    # a built-in module imported first registers after the others its registration loads: the declared
    # order stays
    for name in ("pqv_test_builtin_a", "pqv_test_builtin_b"):
        sys.modules.pop(name)
    home.REG = Registry("thing", builtins=("pqv_test_builtin_a", "pqv_test_builtin_b"))
    importlib.import_module("pqv_test_builtin_a")
    assert home.REG.names() == ("a", "b")

    # a built-in module that fails to import fails the read, and is tried again on the next one
    (tmp_path / "pqv_test_builtin_c.py").write_text("raise ImportError('no runtime here')\n")
    home.REG = Registry("thing", builtins=("pqv_test_builtin_c",))
    for _ in range(2):
        with pytest.raises(ImportError, match="no runtime here"):
            home.REG.names()


def test_the_package_names_resolve_on_first_use():
    import pqv_lightning
    import pqv_lightning.export as export
    from pqv_lightning.callbacks import MobileExport
    from pqv_lightning.export.core import export_mobile

    for package in (pqv_lightning, export):
        assert set(package.__all__) <= set(dir(package))
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        with pytest.raises(AttributeError, match="has no attribute 'nope'"):
            package.nope  # noqa: B018
    assert pqv_lightning.MobileExport is MobileExport and export.export_mobile is export_mobile
    assert export.FORMATS == TARGETS.names()


def test_a_latency_worker_imports_neither_lightning_nor_timm():
    """What every round-robin worker imports to load an exported file: the package's latency module
    and the registry of formats, not Lightning, timm or Torch-Pruning (seconds per worker)."""
    import subprocess
    import sys

    code = (
        "import sys; import pqv_lightning.export.benchmark as b; from pqv_lightning.export.targets import TARGETS; "
        "print(sorted(TARGETS)); print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'lightning', 'pytorch_lightning', 'timm', 'torch_pruning', 'torchvision', 'torchmetrics'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["['onnx', 'openvino', 'pte', 'ptl']", "[]"]


def test_builtin_registries_hold_the_builtin_entries():
    assert IMPORTANCE.names() == ("taylor", "hessian", "l1", "l2", "random")
    assert {n for n, c in IMPORTANCE.items() if c.statistics} == {"taylor", "hessian"}
    assert not IMPORTANCE["random"].deterministic
    assert set(TARGETS.names()) == {"pte", "onnx", "openvino", "ptl"}
    assert PRECISIONS.names() == (
        "fp32",
        "fp16",
        "int8-dynamic",
        "int8-static",
        "int8-dynamic-attention",
        "int8-dynamic-int4-weight",
        "int8-dynamic-int8-weight",
        "int4-weight",
    )
    # every format applies every precision, except int8 attention matmuls (only ONNX Runtime can) and
    # torchao's int4 / int8 weights with per-token activations (only ExecuTorch's XNNPACK, so far) and
    # int4 weight-only (ONNX Runtime's MatMulNBits and OpenVINO's NNCF, not ExecuTorch 1.5.1's lowering)
    assert {(f, p) for f in TARGETS for p in PRECISIONS if not TARGETS[f].supports(PRECISIONS[p])} == {
        (f, "int8-dynamic-attention") for f in ("pte", "openvino", "ptl")
    } | {
        (f, p) for f in ("onnx", "openvino", "ptl") for p in ("int8-dynamic-int4-weight", "int8-dynamic-int8-weight")
    } | {(f, "int4-weight") for f in ("pte", "ptl")}
    with pytest.raises(
        ConfigError,
        match=r"format 'pte' cannot apply precision 'int8-dynamic-attention' "
        r"\(attention_matmuls=True\): ExecuTorch's XNNPACK delegate runs bmm",
    ):
        MobileExportConfig(formats=["pte"], precisions=["int8-dynamic-attention"]).validate()
    assert {"vit_tiny_fmnist", "vit_test_tiny", "deit_base_patch16_224", "deit3_medium_patch16_224"} <= set(MODELS)
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Attention, VisionTransformer
    from torch import nn

    assert ADAPTERS.for_type(VisionTransformerDistilled.__new__(VisionTransformerDistilled)) is not None  # by MRO
    assert VisionTransformer in [t for a in ADAPTERS.values() for t in a.model_types]
    assert DELEGATION_SWAPS.for_type(nn.LayerNorm(4)) is not None
    assert DELEGATION_SWAPS.for_type(Attention(8, num_heads=2)) is not None


# ---------------------------------------------------------------------------------------------- agreement
def _choices(parser: argparse.ArgumentParser, dest: str) -> tuple:
    action = next(a for a in parser._actions if a.dest == dest)
    return tuple(action.choices)


def test_cli_choices_are_the_registries():
    from pqv_lightning.apps.cli import _parser
    from pqv_lightning.apps.demo import add_demo_arguments

    demo = add_demo_arguments(argparse.ArgumentParser())
    assert _choices(demo, "importance") == IMPORTANCE.names()
    assert _choices(demo, "formats") == TARGETS.names()
    assert _choices(demo, "precisions") == PRECISIONS.names()
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert _choices(sub.choices["sweep"], "formats") == TARGETS.names()
    assert _choices(sub.choices["demo"], "importance") == IMPORTANCE.names()


def test_errors_list_every_registered_name():
    from dataclasses import replace

    from pqv_lightning import StructuredPruning
    from pqv_lightning.apps.sweep import QUICK, run_sweep

    def allowed(exc: pytest.ExceptionInfo) -> list[str]:
        return eval(str(exc.value).rsplit("allowed: ", 1)[1])

    with pytest.raises(ConfigError) as exc:
        StructuredPruning(importance="fisher")
    assert allowed(exc) == list(IMPORTANCE.names())
    with pytest.raises(ConfigError) as exc:
        MobileExportConfig(formats=["tflite"]).validate()
    assert allowed(exc) == list(TARGETS.names())
    with pytest.raises(ConfigError) as exc:
        MobileExportConfig(precisions=["int4"]).validate()
    assert allowed(exc) == list(PRECISIONS.names())
    with pytest.raises(ConfigError) as exc:
        run_sweep(replace(QUICK, importances=["fisher"], out_dir="/nonexistent/never-made"))
    assert allowed(exc) == list(IMPORTANCE.names())


def test_a_registered_criterion_is_accepted_everywhere_at_once():
    import torch_pruning as tp

    from pqv_lightning import StructuredPruning
    from pqv_lightning.apps.demo import add_demo_arguments
    from pqv_lightning.pruning.importance import Criterion

    IMPORTANCE.register("l1-test", Criterion(lambda stats, seed: tp.importance.GroupMagnitudeImportance(p=1)))
    try:
        assert StructuredPruning(importance="l1-test").config.importance == "l1-test"
        assert "l1-test" in _choices(add_demo_arguments(argparse.ArgumentParser()), "importance")
    finally:
        IMPORTANCE.unregister("l1-test")
    with pytest.raises(ConfigError):
        StructuredPruning(importance="l1-test")


def test_a_format_without_a_handler_for_a_precision_is_refused_before_work():
    from pqv_lightning.export import FP32, ExportTarget, register_target

    @register_target
    class Fp32Only(ExportTarget):
        format, suffix = "fp32only-test", ".fp32only"

    Fp32Only.handles(FP32)(lambda model, job: model)
    try:
        MobileExportConfig(formats=["fp32only-test"], precisions=["fp32"]).validate()
        with pytest.raises(ConfigError, match="'fp32only-test' cannot apply precision 'int8-dynamic'"):
            MobileExportConfig(formats=["fp32only-test"], precisions=["fp32", "int8-dynamic"]).validate()
    finally:
        TARGETS.unregister("fp32only-test")


# ---------------------------------------------------------------------------------------------- the docs
def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_architecture_doc_has_its_examples():
    assert len(_doc_blocks()) == 4


@pytest.mark.parametrize("index", range(4))
def test_architecture_doc_example_runs(index, tmp_path, monkeypatch):
    block = _doc_blocks()[index]
    if "onnx" in block:
        pytest.importorskip("onnxruntime", reason="pip install 'pqv-lightning[onnx]'")
    monkeypatch.chdir(tmp_path)
    before = {name: set(reg) for name, reg in REGISTRIES.items()}
    try:
        exec(compile(block, f"{DOC.name}[{index}]", "exec"), {"__name__": "doc_example"})
        added = {name: set(reg) - before[name] for name, reg in REGISTRIES.items()}
        assert any(added.values()), "every example registers something"
    finally:
        for name, reg in REGISTRIES.items():
            for new in set(reg) - before[name]:
                reg.unregister(new)


def test_ci_runs_exactly_the_readme_test_command():
    root = DOC.parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"```bash\n# 1\..*?\n(.*?)\n# 2\..*?\n(.*?)\n```", readme, re.S)
    assert block, "the Quick start block with the two commands"
    demo, tests = block.group(1).strip(), block.group(2).strip()
    assert demo == "bash scripts/setup.sh && .venv/bin/pqv demo"
    ci = [
        line
        for line in (root / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [tests]
    assert '-m "not slow"' in tests and "-m slow" in tests  # both tiers


def test_every_precision_handler_has_the_one_signature():
    """One signature for every handler of every target: ``handler(subject, job: PrecisionJob)`` (the 0.1
    handlers took four different ones); another is refused when it registers."""
    import inspect

    from pqv_lightning.export import FP32, ExportTarget, PrecisionJob

    handlers = {(fmt, t.__name__): fn for fmt in TARGETS for t, fn in type(TARGETS[fmt])._handlers.items()}
    assert len(handlers) >= 15
    for key, fn in handlers.items():
        names = list(inspect.signature(fn).parameters)
        assert len(names) == 2 and names[1] == "job", (key, names)

    class Strict(ExportTarget):
        format, suffix = "strict-test", ".strict"

    old_onnx = "def _fp32(fp32, path, work, precision, calibration): ..."
    namespace: dict = {}
    exec(old_onnx, namespace)
    with pytest.raises(
        TypeError,
        match=r"takes \(fp32, path, work, precision, calibration\); a handler takes "
        r"\(subject, job: PrecisionJob\)",
    ):
        Strict.handles(FP32)(namespace["_fp32"])
    assert Strict.handles(FP32)(lambda subject, job: subject)("x", PrecisionJob(FP32)) == "x"


#: packages that are not installed by default (an extra) or that a module may lack: imported where used
OPTIONAL_PACKAGES = {
    "onnx",
    "onnxruntime",
    "onnxscript",
    "openvino",
    "nncf",
    "executorch",
    "torchao",
    "transformers",
    "matplotlib",
    "wandb",
    "yaml",
    "numpy",
    "resource",
    "torchvision",
}
#: modules whose function-level imports are deliberate, and why; every other import is at the top of its module
LAZY_IMPORTS = {
    "pqv_lightning.apps.*": "the pqv parser builds without torch: `pqv --help` imports no heavy module",
    "pqv_lightning.checks": "imported by the pqv parser: torch only where a tensor is checked",
    "pqv_lightning.fileio": "imported by the pqv parser and the latency worker: torch only where tensors load",
    "pqv_lightning.export": "the package's public names load on first use (PEP 562)",
    "pqv_lightning.export.benchmark": "the latency worker: only the module of the file's own format",
    "pqv_lightning.export.host": "imported by the latency worker: the GEMM probes' runtimes load when run",
    "pqv_lightning.export.*_target": "loaded by the latency worker: converters and timm load when a file is written",
    "pqv_lightning.export.eager_quant": "torch.ao's quantization stack loads when a model is quantized",
    "pqv_lightning.export.padding": "reachable from the latency worker's targets: timm loads when a model is padded",
    "pqv_lightning.pruning.adapters": "timm classes that moved between timm releases, looked up when used",
}


def function_level_imports() -> list[tuple[str, str, str]]:
    """(module, function, imported name) for every import inside a function of the package."""
    import ast

    found = []
    for path in ROOT.rglob("*.py"):
        mod = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import):
                        found += [(mod, node.name, a.name) for a in sub.names]
                    elif isinstance(sub, ast.ImportFrom):
                        found.append((mod, node.name, "." * sub.level + (sub.module or "")))
    return found


def test_function_level_imports_only_where_start_up_time_needs_them():
    import fnmatch

    imports = function_level_imports()
    assert len(imports) > 50  # the source really was read
    unexplained = sorted(
        {
            (mod, fn, name)
            for mod, fn, name in imports
            if name.split(".")[0] not in OPTIONAL_PACKAGES
            and not any(fnmatch.fnmatch(mod, pattern) for pattern in LAZY_IMPORTS)
        }
    )
    assert unexplained == []
