"""Width padding before export (pqv_lightning.export.padding): same function, kernel-friendly widths,
refusals that leave the model as it was, and the MobileExportConfig / manifest wiring."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

from pqv_lightning import PruningConfig, prune_once
from pqv_lightning.callbacks import MobileExport
from pqv_lightning.errors import ConfigError
from pqv_lightning.export import MobileExportConfig, WidthPaddingError, export_mobile, pad_widths

from conftest import image_batches, quick_export_config, tiny_vit

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
HAS_OV = all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))


def _pruned(ratio=0.1, **kw):
    model = tiny_vit(**kw).eval()
    prune_once(model, PruningConfig(importance="l2", pruning_ratio=ratio))
    return model


def _widths(model):
    block = model.blocks[0]
    return model.patch_embed.proj.out_channels, block.attn.num_heads * block.attn.head_dim, block.mlp.fc1.out_features


def _random_layer_scales(model):
    with torch.no_grad():
        for block in model.blocks:
            for ls in (block.ls1, block.ls2):
                ls.gamma.uniform_(0.2, 1.5)  # not all alike: the padded rows must follow each channel's scale
    return model


@pytest.mark.parametrize(
    "kw, multiple",
    [
        (dict(), 8),  # cls token, final LayerNorm
        (dict(embed_dim=96, num_heads=3, qkv_bias=True), 16),  # head dims: steps of 16 / gcd(16, 3)
        (dict(init_values=0.5, reg_tokens=2, global_pool="avg", fc_norm=True, class_token=False), 8),  # DeiT3-like
        (dict(no_embed_class=True, init_values=0.5), 32),
    ],
)
def test_pad_widths_keeps_the_function_and_makes_widths_multiples(kw, multiple):
    model = _pruned(**kw)
    if kw.get("init_values"):
        _random_layer_scales(model)
    before = _widths(model)
    assert any(w % multiple for w in before), before  # something to pad
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
    changes = pad_widths(model, multiple, max_growth=1.0)
    after = _widths(model)
    assert all(w % multiple == 0 for w in after), after
    assert changes["embed_dim"] == [before[0], after[0]] and after[0] > before[0]
    assert "kept" not in changes
    with torch.no_grad():
        padded = model(x)
        assert model(x[:1]).shape == (1, 10)
    assert torch.allclose(padded, expected, atol=1e-5, rtol=1e-4), (padded - expected).abs().max()
    assert model.blocks[0].attn.scale == model.blocks[0].attn.head_dim ** -0.5


def test_pad_widths_leaves_widths_that_would_grow_too_much():
    model = _pruned(0.25)  # 64 -> 48 wide: 48 -> 64 would add a third
    state = copy.deepcopy(model.state_dict())
    assert pad_widths(model, 64) == {"kept": {"embed_dim": [48, 64], "head_dim": [12, 16]}}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert pad_widths(model, 16) == {}  # 48 and 192 are multiples of 16 already


def test_pad_widths_refuses_what_it_cannot_pad_and_leaves_the_model_unchanged():
    # unpruned (Torch-Pruning cannot prune q/k norms): head dim 15, hidden 234 -> both would be padded
    model = tiny_vit(qk_norm=True, embed_dim=60, mlp_ratio=3.9).eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(WidthPaddingError, match="q_norm=LayerNorm"):
        pad_widths(model, 8, max_growth=1.0)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the MLP was not padded either
    headless = _pruned()  # pruned with its head, then used as a feature extractor
    headless.reset_classifier(0)
    with pytest.raises(WidthPaddingError, match="head is Identity"):
        pad_widths(headless, 8, max_growth=1.0)
    with pytest.raises(WidthPaddingError, match="Sequential holds no timm VisionTransformer"):
        pad_widths(nn.Sequential(nn.Linear(3, 5)), 8)
    with pytest.raises(ConfigError, match="multiple=1 must be an integer >= 2"):
        pad_widths(_pruned(), 1)


def test_pad_widths_option_is_validated():
    with pytest.raises(ConfigError, match=r"pad_widths='64'; allowed: 'auto', None or an integer >= 2"):
        MobileExportConfig(pad_widths="64").validate()
    with pytest.raises(ConfigError, match="pad_widths=1"):
        MobileExport(pad_widths=1)
    assert MobileExport(pad_widths=None).config.pad_widths is None
    assert MobileExport().config.pad_widths == "auto"


def _export(tmp_path, model, formats, **kw):
    config = quick_export_config(
        tmp_path / "out",
        formats=formats,
        precisions=["fp32"],
        repeats=1,
        warmup=0,
        rank="none",
        min_top1_agreement=0.0,
        **kw,
    )
    return export_mobile(model, torch.randn(1, 1, 32, 32), config, validation_data=image_batches(2, batch=4))


@pytest.mark.slow  # fast tier <= 5 min on 2 cores (issue 29)
@pytest.mark.skipif(not HAS_ONNX, reason="extra not installed: pip install 'pqv-lightning[onnx]'")
def test_export_pads_when_asked_and_verifies_against_the_unpadded_model(tmp_path):
    import onnx

    model = _pruned(embed_dim=128)  # 128 -> 115 wide; padded to 120 / head dims / hidden to multiples of 8
    widths = _widths(model)
    (entry,) = _export(tmp_path, model, ["onnx"], pad_widths=8)["artifacts"]
    assert entry["status"] == "ok", entry.get("reason")
    padding = entry["width_padding"]
    assert padding["applied"] and padding["multiple"] == 8 and padding["max_relative_error"] < 1e-5
    assert padding["widths"]["embed_dim"] == [widths[0], 120]
    assert any(s.startswith("widths padded to multiples of 8, same function: ") for s in entry["optimizations_applied"])
    assert entry["verification"]["max_abs_logit_error"] < 1e-4  # against the unpadded model
    graph = onnx.load(str(tmp_path / "out" / entry["file"])).graph
    assert any(120 in init.dims for init in graph.initializer)
    assert _widths(model) == widths  # the user's model is not touched
    (plain,) = _export(tmp_path, model, ["onnx"], overwrite=True)["artifacts"]  # "auto": ONNX Runtime does not want it
    assert "width_padding" not in plain and not any("padded" in s for s in plain["optimizations_applied"])


@pytest.mark.skipif(not HAS_ONNX, reason="extra not installed: pip install 'pqv-lightning[onnx]'")
@pytest.mark.slow  # fast tier <= 5 min on 2 cores: exports in every format (~18 s)
def test_export_says_why_it_did_not_pad(tmp_path, monkeypatch):
    (entry,) = _export(tmp_path, tiny_vit(qk_norm=True, embed_dim=60).eval(), ["onnx"], pad_widths=8)["artifacts"]
    assert entry["status"] == "ok" and entry["width_padding"]["applied"] is False
    assert any("width padding to multiples of 8: cannot pad head dims" in s for s in entry["optimizations_skipped"])
    (entry,) = _export(tmp_path, _pruned(0.25), ["onnx"], pad_widths=64, overwrite=True)["artifacts"]
    assert entry["width_padding"]["widths"] == {"kept": {"embed_dim": [48, 64], "head_dim": [12, 16]}}
    assert any(
        "left embed_dim 48 (->64), head_dim 12 (->16) as they were: padding would add more than 12.5%" in s
        for s in entry["optimizations_skipped"]
    )

    # some widths padded, others kept (DeiT-base at 18.75 %: embed 624 -> 640, head dim 52 left): both noted
    (entry,) = _export(tmp_path, _pruned(0.125, embed_dim=96, num_heads=3), ["onnx"], pad_widths=8, overwrite=True)[
        "artifacts"
    ]
    assert entry["status"] == "ok" and entry["width_padding"]["applied"] is True
    assert entry["width_padding"]["widths"] == {"embed_dim": [84, 88], "kept": {"head_dim": [28, 32]}}
    assert "widths padded to multiples of 8, same function: embed_dim 84->88" in entry["optimizations_applied"]
    assert any(
        s.startswith("width padding to multiples of 8 left head_dim 28 (->32)") for s in entry["optimizations_skipped"]
    )

    def broken(model, multiple):
        raise RuntimeError("boom")

    monkeypatch.setattr("pqv_lightning.export.core.pad_widths", broken)  # a bug in padding never costs the export
    (entry,) = _export(tmp_path, _pruned(embed_dim=128), ["onnx"], pad_widths=8, overwrite=True)["artifacts"]
    assert entry["status"] == "ok" and entry["width_padding"]["applied"] is False
    assert "width padding to multiples of 8: RuntimeError: boom" in entry["optimizations_skipped"]


@pytest.mark.slow  # fast tier <= 5 min: every format, padded (~20 s)
def test_every_format_exports_the_padded_model_faithfully(tmp_path):
    """pad_widths=8 for every installed format at fp32: each file of the padded model matches the
    unpadded model (the .pte also goes through the delegation-friendly attention swap)."""
    from pqv_lightning.export import TARGETS

    formats = [f for f in ("pte", "onnx", "openvino", "ptl") if TARGETS[f].missing() is None]
    manifest = _export(tmp_path, _pruned(embed_dim=128), formats, pad_widths=8, engines=["x86"])
    assert [a["format"] for a in manifest["artifacts"]] == formats
    for entry in manifest["artifacts"]:
        assert entry["status"] == "ok", entry.get("reason")
        assert entry["width_padding"]["widths"]["embed_dim"][1] == 120
        assert entry["verification"]["max_abs_logit_error"] < 1e-4, entry["format"]


@pytest.mark.skipif(not HAS_OV, reason="extra not installed: pip install 'pqv-lightning[openvino]'")
def test_openvino_pads_to_64_by_default(tmp_path):
    model = _pruned(embed_dim=256, depth=1)  # 256 -> 230 wide, head dim 57: padded to 256 / 64 by default
    (entry,) = _export(tmp_path, model, ["openvino"])["artifacts"]
    assert entry["status"] == "ok", entry.get("reason")
    assert entry["width_padding"]["multiple"] == 64 and entry["width_padding"]["applied"]
    assert entry["width_padding"]["widths"]["embed_dim"] == [_widths(model)[0], 256]
    assert entry["verification"]["max_abs_logit_error"] < 1e-4  # fp32 IR of the padded model == unpadded model
