"""int4 / int8 weights with int8 dynamic activations (8da4w, 8da8w): the pure functions, the `.pte` file, the
refusals."""

import pytest
import torch
from torch import nn

from pqv_lightning.errors import ConfigError
from pqv_lightning.export import PRECISIONS, TARGETS, MobileExportConfig, export_mobile
from pqv_lightning.export.intx import check_intx_groups, intx_layers, quantize_intx_
from pqv_lightning.export.precisions import Int4Weight, Int8DynamicInt4Weight, Int8DynamicInt8Weight

from conftest import image_batches, quick_export_config, tiny_vit

needs_pte = pytest.mark.skipif(TARGETS["pte"].missing() is not None, reason="the executorch extra is not installed")
INT4 = "int8-dynamic-int4-weight"
INT8W = "int8-dynamic-int8-weight"


def test_int4_and_int8_weights_are_registered_precisions_with_the_head_kept_float():
    precision = PRECISIONS[INT4]
    assert isinstance(precision, Int8DynamicInt4Weight) and precision.weight_bits == 4
    assert precision.group_size == 32 and precision.keep_float == ("head",)
    precision = PRECISIONS[INT8W]
    assert isinstance(precision, Int8DynamicInt8Weight) and precision.weight_bits == 8
    assert precision.group_size is None and precision.keep_float == ("head",)


def test_int8_weights_in_groups_are_refused_xnnpack_runs_them_per_channel():
    with pytest.raises(
        ConfigError, match=r"group_size=32, but ExecuTorch's XNNPACK delegate runs 8-bit weights with one scale"
    ):
        check_intx_groups(tiny_vit(depth=1), Int8DynamicInt8Weight(group_size=32))


def test_the_layers_to_quantize_are_every_linear_but_the_head():
    model = tiny_vit(depth=2)
    names = set(intx_layers(model, Int8DynamicInt4Weight()))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert names == linears - {"head"} and len(names) == 8
    # keep_float takes whole modules too: a block's Linear layers all stay
    names = set(intx_layers(model, Int8DynamicInt4Weight(keep_float=("head", "blocks.0"))))
    assert names == {n for n in linears if n.startswith("blocks.1.")}


def test_quantize_intx_changes_the_chosen_weights_only_and_stays_close():
    model = tiny_vit(depth=2, embed_dim=64).eval()
    x = torch.randn(4, 1, 32, 32)
    before, head = model(x), model.head.weight.detach().clone()
    names = quantize_intx_(model, Int8DynamicInt4Weight(group_size=32))
    assert len(names) == 8
    assert type(model.head.weight) is nn.Parameter and torch.equal(model.head.weight, head)
    assert type(model.blocks[0].mlp.fc1.weight.data) is not torch.Tensor  # a torchao int4 tensor now
    after = model(x)
    cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1)
    assert cosine.min() > 0.95 and not torch.equal(before, after), cosine


@pytest.mark.parametrize(
    ("group", "message"),
    [
        (
            48,
            r"group_size=48 must be a multiple of 32 .*; group sizes that divide every quantized layer's input "
            r"width and ExecuTorch's XNNPACK delegate can run: \[32, 64\], or group_size=None",
        ),
        (128, r"group_size=128 does not divide the input width 64 of layer 'blocks.0.attn.qkv'; .*\[32, 64\]"),
        (0, r"group_size=0 must be a multiple of 32"),
        (True, r"group_size=True must be a multiple of 32"),
    ],
)
def test_a_group_size_that_does_not_fit_names_the_layer_and_what_would_work(group, message):
    with pytest.raises(ConfigError, match=message):
        check_intx_groups(tiny_vit(depth=1, embed_dim=64), Int8DynamicInt4Weight(group_size=group))


def test_widths_no_multiple_of_32_divides_leave_only_per_channel_scales():
    model = tiny_vit(depth=1, embed_dim=48, num_heads=3)  # 48 wide: no multiple of 32 divides it
    with pytest.raises(ConfigError, match=r"greatest common divisor is 48\): use group_size=None"):
        check_intx_groups(model, Int8DynamicInt4Weight(group_size=32))
    assert len(check_intx_groups(model, Int8DynamicInt4Weight(group_size=None))) == 4


def test_a_model_with_no_linear_left_to_quantize_is_refused():
    with pytest.raises(ConfigError, match=r"has no Linear layer to quantize \(keep_float=\['head', 'blocks'\] keeps 5"):
        check_intx_groups(tiny_vit(depth=1), Int8DynamicInt4Weight(keep_float=("head", "blocks")))
    with pytest.raises(ConfigError, match="Conv2d has no Linear layer to quantize"):
        check_intx_groups(nn.Conv2d(1, 4, 3), Int8DynamicInt4Weight())


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "ptl"])
def test_formats_without_an_int4_kernel_refuse_it_with_the_reason(fmt):
    with pytest.raises(
        ConfigError, match=rf"format '{fmt}' cannot apply precision '{INT4}' .*ExecuTorch's XNNPACK delegate"
    ):
        MobileExportConfig(formats=[fmt], precisions=[INT4]).validate()


@needs_pte
def test_export_refuses_a_bad_group_before_touching_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    PRECISIONS.register("int4-g128-test", Int8DynamicInt4Weight(name="int4-g128-test", group_size=128))
    try:
        config = quick_export_config(out, formats=["pte"], precisions=["int4-g128-test"], overwrite=True)
        with pytest.raises(ConfigError, match="does not divide the input width 64 of layer 'blocks.0.attn.qkv'"):
            export_mobile(tiny_vit(depth=1), torch.randn(1, 1, 32, 32), config)
    finally:
        PRECISIONS.unregister("int4-g128-test")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow  # fast tier <= 5 min (issue 29); tests/test_qat.py checks the torchao numerics it lowers
@needs_pte
def test_the_int4_pte_file_runs_what_torchao_computes(tmp_path):
    """The lowered file agrees with the torchao-quantized model it came from (the lowering is exact up
    to float rounding) and stays close to fp32; the manifest says what was done."""
    model = tiny_vit(depth=2, embed_dim=64)
    config = quick_export_config(tmp_path / "out", formats=["pte"], precisions=[INT4], min_top1_agreement=0.0)
    manifest = export_mobile(model, torch.randn(1, 1, 32, 32), config, validation_data=image_batches(2))
    (entry,) = manifest["artifacts"]
    assert entry["status"] == "ok", entry.get("reason")
    assert entry["verification"]["quantized_reference_cosine"] > 0.999
    assert entry["verification"]["cosine"] > 0.95
    assert entry["intx_layers"] == 8 and entry["partitions"] >= 1
    assert any(
        "int4 weights (groups of 32, symmetric)" in a and "fp32: ['head']" in a for a in entry["optimizations_applied"]
    )


@pytest.mark.slow
@needs_pte
def test_the_int8_weight_pte_file_runs_what_torchao_computes(tmp_path):
    model = tiny_vit(depth=1, embed_dim=64)
    config = quick_export_config(tmp_path / "out", formats=["pte"], precisions=[INT8W], min_top1_agreement=0.0)
    manifest = export_mobile(model, torch.randn(1, 1, 32, 32), config, validation_data=image_batches(2))
    (entry,) = manifest["artifacts"]
    assert entry["status"] == "ok", entry.get("reason")
    assert entry["verification"]["quantized_reference_cosine"] > 0.9999
    assert any("int8 weights (one scale per output channel" in a for a in entry["optimizations_applied"])


# ---------------------------------------------------------------------------------------------- int4 weight-only
INT4W = "int4-weight"


# openvino's int4 file is also checked in the fast tier by the keep_float test below
@pytest.mark.parametrize("fmt", ["onnx", pytest.param("openvino", marks=pytest.mark.slow)])
def test_int4_weight_only_files_are_smaller_and_stay_close_in_every_runtime_that_has_kernels(tmp_path, fmt):
    if TARGETS[fmt].missing() is not None:
        pytest.skip(f"the {fmt} extra is not installed")
    model = tiny_vit(depth=2, embed_dim=64)
    config = quick_export_config(tmp_path / "out", formats=[fmt], precisions=["fp32", INT4W], min_top1_agreement=0.0)
    manifest = export_mobile(model, torch.randn(1, 1, 32, 32), config, validation_data=image_batches(2))
    fp32, int4 = manifest["artifacts"]
    assert fp32["status"] == int4["status"] == "ok", int4.get("reason")
    assert int4["verification"]["cosine"] > 0.95
    # 8 of the 9 Linear layers (the head stays fp32): int4 + scales is well under half the fp32 file
    assert int4["size_bytes"] < 0.45 * fp32["size_bytes"], (int4["size_bytes"], fp32["size_bytes"])
    applied = " ".join(int4["optimizations_applied"])
    if fmt == "onnx":
        assert int4["intx_layers"] == 8 and "MatMulNBitsQuantizer" in applied
    else:
        assert "INT4_SYM, groups of 32, every Linear but ['head']" in applied
        assert int4["inference_precision"] == "f32"


def test_a_registered_int4_precision_with_larger_groups_writes_a_smaller_file(tmp_path):
    """What benchmarks/int4_groups.py measures on DeiT-base (groups of 64: 0.154x of the fp32 file instead of
    0.161x): a user registers the group size they want. In ONNX the head is a Gemm node, which MatMulNBits
    does not quantize: keep_float=() leaves it fp32 (documented on Int4Weight)."""
    if TARGETS["onnx"].missing() is not None:
        pytest.skip("the onnx extra is not installed")
    added = {
        "int4-g64-test": Int4Weight(name="int4-g64-test", group_size=64),
        "int4-g64-head-test": Int4Weight(name="int4-g64-head-test", group_size=64, keep_float=()),
    }
    for name, precision in added.items():
        PRECISIONS.register(name, precision)
    try:
        model = tiny_vit(depth=2, embed_dim=64)
        config = quick_export_config(
            tmp_path / "out", formats=["onnx"], precisions=[INT4W, *added], min_top1_agreement=0.0
        )
        manifest = export_mobile(model, torch.randn(1, 1, 32, 32), config, validation_data=image_batches(2))
    finally:
        for name in added:
            PRECISIONS.unregister(name)
    files = {a["precision"]: a for a in manifest["artifacts"]}
    assert all(a["status"] == "ok" for a in files.values()), files
    assert files["int4-g64-test"]["size_bytes"] < files[INT4W]["size_bytes"]  # half the scales
    assert files["int4-g64-test"]["intx_layers"] == files["int4-g64-head-test"]["intx_layers"] == 8
    assert files["int4-g64-head-test"]["size_bytes"] == files["int4-g64-test"]["size_bytes"]


def test_int4_weight_in_an_openvino_ir_keeps_the_keep_float_layers_float(tmp_path):
    if TARGETS["openvino"].missing() is not None:
        pytest.skip("the openvino extra is not installed")
    import openvino as ov

    from pqv_lightning.export.openvino_target import export_openvino

    counts = {}
    for keep in [("head",), ("head", "blocks.0")]:
        precision = Int4Weight(name=f"int4-keep-{len(keep)}", keep_float=keep)
        path = tmp_path / f"{len(keep)}.xml"
        export_openvino(tiny_vit(depth=2), torch.randn(1, 1, 32, 32), precision, str(path))
        ir = ov.Core().read_model(str(path))
        counts[keep] = sum(
            op.get_type_name() == "Constant" and str(op.get_element_type()) == "<Type: 'int4_t'>" for op in ir.get_ops()
        )
    assert counts == {("head",): 8, ("head", "blocks.0"): 4}


def test_int4_weight_group_rules_per_runtime_name_what_works():
    model = tiny_vit(depth=1, embed_dim=96, num_heads=3)  # widths 96 and 384
    with pytest.raises(ConfigError, match=r"group_size=None .*MatMulNBits quantizes in groups only; .*\[16, 32\]"):
        TARGETS["onnx"].check_model(model, Int4Weight(group_size=None))
    with pytest.raises(ConfigError, match=r"group_size=48 must be a power of two and at least 16 \(ONNX Runtime's"):
        TARGETS["onnx"].check_model(model, Int4Weight(group_size=48))
    TARGETS["openvino"].check_model(model, Int4Weight(group_size=48))  # NNCF takes any divisor
    TARGETS["openvino"].check_model(model, Int4Weight(group_size=None))
    with pytest.raises(ConfigError, match=r"group_size=64 does not divide the input width 96 of layer"):
        TARGETS["openvino"].check_model(model, Int4Weight(group_size=64))


@pytest.mark.parametrize("fmt", ["pte", "ptl"])
def test_formats_without_a_working_int4_weight_only_path_refuse_it_naming_where_it_runs(fmt):
    with pytest.raises(
        ConfigError, match=rf"format '{fmt}' cannot apply precision 'int4-weight' .*formats 'onnx' \(MatMulNBits\)"
    ):
        MobileExportConfig(formats=[fmt], precisions=[INT4W]).validate()
