"""ExecuTorch (.pte), ONNX and OpenVINO targets: round trips through their runtimes, manifest fields,
delegation, the fp16 LayerNorm workaround, and the module swaps behind them."""

import copy
import hashlib
import importlib.util
import json

import pytest
import torch
from torch import nn

from pqv_lightning import PruningConfig, prune_once
from pqv_lightning.export import TARGETS, MobileExportConfig, export_mobile
from pqv_lightning.export.delegation import (
    DelegatableAttention,
    DelegatableLayerNorm,
    Fp32LayerNorm,
    keep_layernorm_fp32,
    make_delegation_friendly,
)
from pqv_lightning.hostcpu import has_any_feature

from conftest import image_batches, tiny_vit

HAS_ET = importlib.util.find_spec("executorch") is not None and importlib.util.find_spec("torchao") is not None
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
needs_et = pytest.mark.skipif(not HAS_ET, reason="extra not installed: pip install 'pqv-lightning[executorch]'")
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="extra not installed: pip install 'pqv-lightning[onnx]'")
HAS_OV = all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))
needs_ov = pytest.mark.skipif(not HAS_OV, reason="extra not installed: pip install 'pqv-lightning[openvino]'")
ALLOWED_OUTSIDE_XNNPACK = {"aten.expand_copy.default", "aten.select_copy.int"}  # cls-token expand, cls-token pick


_data = image_batches


def _export(tmp_path, model, formats, precisions, **kw):
    kw.setdefault("output_dir", str(tmp_path / "out"))
    kw.setdefault("repeats", 2)
    kw.setdefault("warmup", 1)
    kw.setdefault("measure_memory", False)
    kw.setdefault("rank", "in-process")  # round-robin ranking has its own tests
    kw.setdefault("min_top1_agreement", 0.7)  # random-init logits are nearly tied: cosine is the real check
    config = MobileExportConfig(formats=formats, precisions=precisions, **kw)
    return export_mobile(model, torch.randn(1, 1, 32, 32), config, validation_data=_data())


def _check_file(tmp_path, entry):
    assert entry["status"] == "ok", entry.get("reason")
    path = tmp_path / "out" / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert entry["size_bytes"] == path.stat().st_size
    v = entry["verification"]
    assert v["samples"] == 24 and 0.0 <= v["top1_accuracy"] <= 1.0
    assert entry["latency"]["median_ms"] > 0 and entry["latency"]["speedup_vs_fp32_eager"] > 0
    return v


# ---------------------------------------------------------------------------------------------- module swaps
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(qk_norm=True),
        dict(init_values=1e-1, no_embed_class=True),
        dict(embed_dim=256, num_heads=8, global_pool="avg"),
    ],
)
def test_delegation_swaps_compute_the_same_function(kw):
    model = tiny_vit(**kw).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = copy.deepcopy(model)
    counts = make_delegation_friendly(swapped)
    assert counts.get("Attention") == 2
    assert counts.get("LayerNorm", 0) >= 5 + (4 if kw.get("qk_norm") else 0)  # 2 per block + final (+ q/k norms)
    assert not any(isinstance(m, nn.LayerNorm) for m in swapped.modules())
    if kw.get("qk_norm"):  # the q/k norms inside the swapped attention were swapped first
        assert all(
            isinstance(m.q_norm, DelegatableLayerNorm) for m in swapped.modules() if isinstance(m, DelegatableAttention)
        )
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():  # the source model is untouched
        assert torch.equal(v, before[k])


def test_delegatable_attention_refuses_masks():
    attn = DelegatableAttention(tiny_vit().blocks[0].attn)
    with pytest.raises(ValueError, match="unmasked self-attention only"):
        attn(torch.randn(1, 5, 64), attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_fp32_layernorm_wrapper_computes_in_fp32():
    norm = nn.LayerNorm(256)
    nn.init.normal_(norm.weight)
    x = torch.randn(2, 7, 256) * 10 + 3
    half = keep_layernorm_fp32(nn.Sequential(copy.deepcopy(norm)).half())
    assert half == 1
    wrapped = Fp32LayerNorm(copy.deepcopy(norm))
    out = wrapped(x.half())
    assert out.dtype == torch.float16 and wrapped.norm.weight.dtype == torch.float32
    torch.testing.assert_close(out.float(), norm(x.half().float()), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------- ExecuTorch
@needs_et
@pytest.mark.parametrize(
    "precision",
    [
        pytest.param("fp32", marks=pytest.mark.slow),  # fast tier <= 5 min: int8-dynamic lowers the same graph
        # the fast tier lowers fp32 and int8-dynamic .pte files in conftest's exported_tiny fixture
        pytest.param("int8-dynamic", marks=pytest.mark.slow),
        pytest.param("fp16", marks=pytest.mark.slow),
        pytest.param("int8-static", marks=pytest.mark.slow),
    ],
)
def test_pte_round_trips_through_the_executorch_runtime(tmp_path, precision):
    model = tiny_vit(depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manifest = _export(tmp_path, model, ["pte"], [precision])
    (entry,) = manifest["artifacts"]
    assert entry["file"] == f"model_{precision}.pte" and entry["format"] == "pte" and entry["engine"] is None
    v = _check_file(tmp_path, entry)
    assert entry["module_swaps"] == {"Attention": 1, "LayerNorm": 3}
    if precision == "fp32":
        assert v["max_abs_logit_error"] < 1e-4
    elif precision == "fp16":
        assert v["cosine"] > 0.999 and entry["fp32_layernorms"] == 3
    else:
        assert v["cosine"] > 0.99
        # the .pte reproduces its in-Python pt2e model: the lowering itself is faithful
        assert v["quantized_reference_cosine"] > (0.9999 if precision == "int8-static" else 0.999)
        assert v["quantized_reference_samples"] == 8  # the first of the three verify batches
    if precision != "fp16":  # the whole network is one XNNPACK partition after the cls-token pick
        assert entry["partitions"] <= 2
        assert set(entry["non_delegated_ops"]) <= ALLOWED_OUTSIDE_XNNPACK
    else:
        assert entry["partitions"] >= 1
    assert any("XnnpackPartitioner" in o for o in entry["optimizations_applied"])
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k])


@needs_et
def test_shared_provenance_writes_the_same_program_and_puts_torch_back(monkeypatch):
    """Lowering with provenance shared instead of deep-copied (a fifth of the lowering time) writes
    the same bytes as torch's own copying, and leaves torch.fx.traceback as it found it."""
    import contextlib

    import torch.fx.traceback as fx_traceback

    from pqv_lightning.export import executorch_target

    model, x = tiny_vit(depth=1).eval(), torch.randn(1, 1, 32, 32)
    seen = []
    real = executorch_target.shared_provenance

    @contextlib.contextmanager
    def spy():
        with real():
            seen.append(type(fx_traceback.copy).__name__)
            yield

    monkeypatch.setattr(executorch_target, "shared_provenance", spy)
    shared, _, _ = executorch_target.lower_to_executorch(model, x, "int8-dynamic")
    assert seen == ["_ShareNodeSources"] and fx_traceback.copy is copy
    monkeypatch.setattr(executorch_target, "shared_provenance", contextlib.nullcontext)
    deep, _, _ = executorch_target.lower_to_executorch(model, x, "int8-dynamic")
    assert shared == deep
    # the stand-in copies a NodeSource list shallowly and everything else deeply
    stand_in = executorch_target._ShareNodeSources(fx_traceback.NodeSource)
    sources = [fx_traceback.NodeSource(None, "p")]
    assert stand_in.deepcopy(sources) == sources and stand_in.deepcopy(sources) is not sources
    nested = {"a": [1, [2]]}
    assert stand_in.deepcopy(nested) == nested and stand_in.deepcopy(nested)["a"][1] is not nested["a"][1]


@needs_et
@pytest.mark.slow  # fast tier <= 5 min on 2 cores: a width-256 .pte lowering (~9 s)
def test_pte_fp16_keeps_layernorm_fp32_at_width_256(tmp_path):
    """ExecuTorch 1.5.1 computes fp16 LayerNorm wrongly for widths >= 256 on x86; ours must be right."""
    manifest = _export(
        tmp_path, tiny_vit(embed_dim=256, num_heads=8, depth=1), ["pte"], ["fp16"], delegation_friendly=False
    )
    (entry,) = manifest["artifacts"]
    assert entry["verification"]["cosine"] > 0.999, entry["verification"]
    assert entry["fp32_layernorms"] == 3 and entry["module_swaps"] == {}
    assert any("LayerNorm kept fp32" in o for o in entry["optimizations_applied"])


@needs_et
def test_executorch_fp16_layernorm_bug_still_exists():
    """Canary for the workaround above: when this fails, ExecuTorch fixed fp16 LayerNorm and the
    fp32 LayerNorm wrapper can go."""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    norm = nn.LayerNorm(256).half().eval()
    x = (torch.randn(1, 8, 256) * 4).half()
    program = to_edge_transform_and_lower(torch.export.export(norm, (x,))).to_executorch()
    buffer = program.buffer  # the runtime program borrows these bytes: keep them alive while it runs
    loaded = Runtime.get().load_program(buffer)
    out = loaded.load_method("forward").execute([x])[0]
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), norm(x).float().flatten(), dim=0)
    assert cos < 0.99


@needs_et
@pytest.mark.slow  # fast tier <= 5 min on 2 cores: a .pte lowering (~8 s)
def test_without_swaps_a_vit_splits_into_many_partitions(tmp_path):
    manifest = _export(tmp_path, tiny_vit(depth=1), ["pte"], ["fp32"], delegation_friendly=False)
    (entry,) = manifest["artifacts"]
    assert entry["status"] == "ok" and entry["partitions"] > 2
    assert "aten.native_layer_norm.default" in entry["non_delegated_ops"]


@pytest.mark.slow
@needs_et
def test_pruned_network_exports_to_pte(tmp_path):
    model = tiny_vit(embed_dim=64, depth=2, num_heads=4)
    prune_once(model, PruningConfig(importance="l2", pruning_ratio=0.25, prune_head_dims=True, round_to=2))
    assert model.blocks[0].attn.head_dim < 16
    manifest = _export(tmp_path, model, ["pte"], ["fp32", "int8-dynamic"])
    fp32, int8 = manifest["artifacts"]
    assert fp32["status"] == int8["status"] == "ok"
    assert fp32["verification"]["max_abs_logit_error"] < 1e-4 and int8["verification"]["cosine"] > 0.99
    assert fp32["partitions"] <= 2


@pytest.mark.slow  # fast tier <= 5 min: reads the exported_tiny set (~60 s to build)
@needs_et
def test_pte_memory_from_its_timing_process_is_the_files_own_like_a_probe(exported_tiny):
    from pqv_lightning.export.core import _inference_memory

    out, manifest = exported_tiny
    memory = next(a for a in manifest["artifacts"] if a["file"] == "model_int8-dynamic.pte")["memory"]
    assert memory["measured_in"] == "round-robin timing process", memory
    assert memory["peak_rss_mb"] > memory["load_and_inference_mb"] > 0
    probe = _inference_memory(TARGETS["pte"].memory_probe, str(out / "model_int8-dynamic.pte"), (1, 1, 32, 32), 2, None)
    assert "error" not in probe and probe["measured_in"] == "probe"
    # the runtime's import (~200 MB for ExecuTorch) is in neither: the model's own memory is a few MB
    assert abs(memory["load_and_inference_mb"] - probe["load_and_inference_mb"]) < 50
    assert abs(memory["peak_rss_mb"] - probe["peak_rss_mb"]) < 100


# ---------------------------------------------------------------------------------------------- ONNX
@needs_onnx
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-dynamic", "int8-static"])
def test_onnx_round_trips_through_onnxruntime(tmp_path, precision):
    import onnx

    manifest = _export(tmp_path, tiny_vit(depth=1), ["onnx"], [precision])
    (entry,) = manifest["artifacts"]
    assert entry["file"] == f"model_{precision}.onnx" and entry["format"] == "onnx"
    v = _check_file(tmp_path, entry)
    if precision == "fp32":
        assert v["max_abs_logit_error"] < 1e-4
    else:
        assert v["cosine"] > (0.999 if precision == "fp16" else 0.99)
    path = tmp_path / "out" / entry["file"]
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)  # one file
    assert not list((tmp_path / "out").glob("*.data"))
    ops = {n.op_type for n in proto.graph.node}
    if precision == "int8-static":
        assert "QuantizeLinear" in ops and entry["quantized_op_types"] == ["MatMul", "Gemm", "Conv"]
    if precision == "int8-dynamic":
        assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    assert entry["opset"] >= 17


@needs_onnx
def test_onnx_int8_attention_matmuls(tmp_path):
    import onnx

    manifest = _export(tmp_path, tiny_vit(depth=2), ["onnx"], ["int8-dynamic", "int8-dynamic-attention"])
    plain, attention = manifest["artifacts"]
    assert (plain["attention_matmuls"], attention["attention_matmuls"]) == ("fp32", "int8")
    ops = {}
    for entry in (plain, attention):
        _check_file(tmp_path, entry)
        graph = onnx.load(str(tmp_path / "out" / entry["file"])).graph
        ops[entry["precision"]] = [n.op_type for n in graph.node if n.op_type in ("MatMul", "MatMulInteger")]
    # 2 blocks x (q @ k.T, attn @ v): float MatMuls in int8-dynamic, integer ones with the option
    assert ops["int8-dynamic"].count("MatMul") == 4
    assert "MatMul" not in ops["int8-dynamic-attention"]
    assert len(ops["int8-dynamic-attention"]) == len(ops["int8-dynamic"])
    assert attention["verification"]["cosine"] > 0.99


@pytest.mark.slow  # fast tier <= 5 min: reads the exported_tiny set (~60 s to build)
@needs_onnx
def test_onnx_takes_any_batch_and_its_sessions_do_not_spin(exported_tiny):
    from pqv_lightning.export.onnx_target import ort_session

    out, manifest = exported_tiny
    memory = next(a for a in manifest["artifacts"] if a["file"] == "model_fp32.onnx")["memory"]
    assert "error" not in memory and memory["load_and_inference_mb"] > 0
    session = ort_session(str(out / "model_fp32.onnx"), threads=2)
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2
    for batch in (1, 5):
        assert session.run(None, {"input": torch.randn(batch, 1, 32, 32).numpy()})[0].shape == (batch, 10)


# ---------------------------------------------------------------------------------------------- OpenVINO
@needs_ov
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-dynamic", "int8-static"])
def test_openvino_round_trips_through_the_openvino_runtime(tmp_path, precision):
    import openvino as ov

    from pqv_lightning.export.openvino_target import compile_ir

    manifest = _export(tmp_path, tiny_vit(depth=1), ["openvino"], [precision])
    (entry,) = manifest["artifacts"]
    assert entry["status"] == "ok", entry.get("reason")
    assert entry["file"] == f"model_{precision}.xml" and entry["companions"] == [f"model_{precision}.bin"]
    xml, weights = tmp_path / "out" / entry["file"], tmp_path / "out" / entry["companions"][0]
    assert hashlib.sha256(xml.read_bytes()).hexdigest() == entry["sha256"]
    assert entry["size_bytes"] == xml.stat().st_size + weights.stat().st_size
    assert entry["runtime"].startswith("OpenVINO") and entry["inference_precision"] in ("f32", "bf16", "f16")
    v = entry["verification"]
    assert v["samples"] == 24
    ops = {op.get_type_name() for op in ov.Core().read_model(str(xml)).get_ops()}
    if precision == "fp32":  # fp32 means fp32, also on hosts where the plugin would pick bf16
        assert entry["inference_precision"] == "f32" and entry["runtime_options"] == {"INFERENCE_PRECISION_HINT": "f32"}
        assert v["max_abs_logit_error"] < 1e-4
    else:
        assert v["cosine"] > (0.999 if precision == "fp16" else 0.99)
    if precision == "int8-static":
        assert "FakeQuantize" in ops
    element_types = {
        op.get_output_element_type(0).type_name
        for op in ov.Core().read_model(str(xml)).get_ops()
        if op.get_type_name() == "Constant"
    }
    if precision == "int8-dynamic":
        assert "i8" in element_types  # int8 weights in the file
    if precision == "fp16":
        assert "f16" in element_types
    assert not list((tmp_path / "out").glob(".*"))  # no staged leftovers
    compiled = compile_ir(str(xml), threads=2)
    for batch in (1, 5):  # the IR keeps a free batch dimension: any batch
        assert compiled(torch.randn(batch, 1, 32, 32).numpy())[0].shape == (batch, 10)
    # our runner compiles one static-shape model per input shape, with the same results
    assert "compiled at static input shapes (one compiled model per shape)" in entry["optimizations_applied"]
    run = TARGETS["openvino"].load(str(xml), torch.zeros(1, 1, 32, 32), threads=2)
    assert list(run.compiled) == [(1, 1, 32, 32)]
    x = torch.randn(5, 1, 32, 32)
    static, dynamic = run(x), torch.from_numpy(compiled(x.numpy())[0])
    assert list(run.compiled) == [(1, 1, 32, 32), (5, 1, 32, 32)]
    assert all(not model.input(0).get_partial_shape().is_dynamic for model, _, _ in run.compiled.values())
    assert torch.nn.functional.cosine_similarity(static.flatten(), dynamic.flatten(), dim=0) > 0.9999
    if precision == "fp32":
        assert torch.allclose(static, dynamic, atol=1e-5)
        for batch in (2, 3, 4, 6):  # the oldest compiled shapes are dropped
            assert run(torch.randn(batch, 1, 32, 32)).shape == (batch, 10)
        assert list(run.compiled) == [(2, 1, 32, 32), (3, 1, 32, 32), (4, 1, 32, 32), (6, 1, 32, 32)]


@needs_ov
def test_openvino_int8_dynamic_says_whether_the_plugin_quantizes_activations(tmp_path):
    """The CPU plugin's dynamic quantization depends on the host and its inference precision: the
    manifest records what the file really does here, found by running it (not assumed)."""
    import openvino as ov

    from pqv_lightning.export.openvino_target import compile_ir, dynamic_quantization_active

    manifest = _export(tmp_path, tiny_vit(depth=1), ["openvino"], ["int8-dynamic", "fp32"])
    dyn, fp32 = manifest["artifacts"]
    assert dyn["status"] == fp32["status"] == "ok"
    out, shape = tmp_path / "out", (1, 1, 32, 32)
    active = dynamic_quantization_active(str(out / dyn["file"]), shape)
    assert dyn["dynamic_quantization"] is active
    said = [a for a in dyn["optimizations_applied"] if a.startswith("activations")]
    assert said == [
        (
            "activations quantized to int8 per call by the CPU plugin (dynamic quantization, group size "
            f"{dyn['dynamic_quantization_group_size']})"
        )
        if active
        else (
            "activations not quantized on this host: the CPU plugin decompresses the int8 weights into "
            f"{dyn['inference_precision']} GEMMs (its dynamic quantization did not apply)"
        )
    ]
    assert "dynamic_quantization" not in fp32
    # no false positive: a file without compressed weights gives identical outputs either way
    assert dynamic_quantization_active(str(out / fp32["file"]), shape) is False
    # and when the plugin is told to compute in f32 on a host with int8 dot-product units, it does quantize:
    # the same input gives different logits with dynamic quantization on and off
    if has_any_feature(("avx512_vnni", "amx_int8")):
        model = ov.Core().read_model(str(out / dyn["file"]))
        model.set_rt_info("f32", ["runtime_options", "INFERENCE_PRECISION_HINT"])
        ov.save_model(model, str(tmp_path / "f32.xml"), compress_to_fp16=False)
        assert (
            compile_ir(str(tmp_path / "f32.xml"), 1, shape).get_property("INFERENCE_PRECISION_HINT").type_name == "f32"
        )
        assert dynamic_quantization_active(str(tmp_path / "f32.xml"), shape) is True


@needs_ov
def test_openvino_interrupt_leaves_neither_xml_nor_bin(tmp_path, monkeypatch):
    import pqv_lightning.export.core as core

    real, calls = core._latency, {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # after the baseline: while timing the staged IR
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(core, "_latency", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _export(tmp_path, tiny_vit(depth=1), ["openvino"], ["fp32"])
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------- all together
@needs_et
@pytest.mark.slow  # fast tier <= 5 min: every format twice (~20 s)
@needs_onnx
@needs_ov
def test_every_format_in_one_manifest_and_overwrite_replaces_all_of_them(tmp_path):
    manifest = _export(
        tmp_path, tiny_vit(depth=1), ["pte", "onnx", "openvino", "ptl"], ["int8-dynamic"], engines=["x86"]
    )
    assert [a["file"] for a in manifest["artifacts"]] == [
        "model_int8-dynamic.pte",
        "model_int8-dynamic.onnx",
        "model_int8-dynamic.xml",
        "model_int8-dynamic_x86.ptl",
    ]
    assert all(a["status"] == "ok" for a in manifest["artifacts"])
    assert [a["runtime"] for a in manifest["artifacts"]] == [
        "ExecuTorch (XNNPACK delegate)",
        "ONNX Runtime (CPU)",
        "OpenVINO (CPU plugin)",
        "Lite Interpreter",
    ]
    assert {"executorch", "onnxruntime", "openvino", "nncf", "torch"} <= set(manifest["versions"])
    assert (tmp_path / "out" / "model_int8-dynamic.bin").is_file()
    manifest = _export(tmp_path, tiny_vit(depth=1), ["onnx"], ["fp32"], overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model_fp32.onnx"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["artifacts"][0]["file"] == "model_fp32.onnx"


def test_missing_extra_is_named_before_any_work(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    with pytest.raises(
        ValueError, match=r"format 'pte' needs \['executorch'\]: pip install 'pqv-lightning\[executorch\]'"
    ):
        MobileExportConfig(formats=["pte"]).validate()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(
        ValueError, match=r"format 'openvino' needs \['nncf'\]: pip install 'pqv-lightning\[openvino\]'"
    ):
        MobileExportConfig(formats=["openvino"]).validate()
    with pytest.raises(ValueError, match=r"formats=\['tflite'\]: unknown \['tflite'\]; allowed: \["):
        MobileExportConfig(formats=["tflite"]).validate()


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static"])
def test_ptl_int8_reads_per_channel(name):
    """``.ptl`` quantization honours ``per_channel`` (it ignored it: every int8-dynamic file was per
    tensor whatever the config said) on every engine this torch has."""
    from dataclasses import replace

    from pqv_lightning.export import PRECISIONS
    from pqv_lightning.export.torchscript_target import quantize_torch_ao
    from pqv_lightning.settings import quantized_engine

    model, x = tiny_vit().eval(), torch.randn(2, 1, 32, 32)
    for engine in [
        e for e in ("x86", "fbgemm", "qnnpack", "onednn") if e in torch.backends.quantized.supported_engines
    ]:
        schemes = {}
        for per_channel in (True, False):
            precision = replace(PRECISIONS[name], per_channel=per_channel)
            with quantized_engine(engine):
                q = quantize_torch_ao(model, precision, engine, x, [x])
                fc1 = q.get_submodule("blocks.0.mlp.fc1")
                weight = fc1.weight() if callable(fc1.weight) else fc1.weight
                assert q(x).shape == (2, 10)
            schemes[per_channel] = weight.qscheme()
        assert schemes == {True: torch.per_channel_affine, False: torch.per_tensor_affine}, (engine, schemes)
