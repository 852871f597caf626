"""compress(): post-training pruning + reconstruction, export, verification and the trade-off table,
resumable by stage; and ``pqv compress``."""

import copy
import json

import pytest
import torch

from pqv_lightning.apps.cli import main
from pqv_lightning.compress import CompressConfig, compress, load_compressed
from pqv_lightning.errors import ConfigError
from pqv_lightning.models import save_vit_checkpoint
from pqv_lightning.pruning import PruningConfig, StructuredPruner

from conftest import quick_export_config, tiny_vit


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _config(out, **pruning):
    pruning = {"importance": "l2", "pruning_ratio": 0.5, "reconstruct": True, **pruning}
    return CompressConfig(
        pruning=PruningConfig(**pruning),
        export=quick_export_config(out, formats=["onnx"], precisions=["fp32", "int8-dynamic"]),
        batch_size=64,
    )


def test_compress_prunes_exports_verifies_and_leaves_the_model_alone(tmp_path):
    model = tiny_vit()
    before = copy.deepcopy(model.state_dict())
    images, labels = _data()
    report = compress(model, images, _config(tmp_path, iterative_steps=2), validation=[(images[:128], labels[:128])])

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    prune = report["stages"]["prune"]
    assert len(prune["events"]) == 2 and prune["ratio_reached"] == pytest.approx(0.5, abs=0.05)
    assert prune["params_after"] < 0.4 * prune["params_before"]
    assert prune["events"][-1]["reconstruction_error_after"] < prune["events"][-1]["reconstruction_error_before"]
    assert set(report["stages"]["accuracy"]) == {"images", "unpruned", "pruned"}
    assert report["stages"]["accuracy"]["images"] == 128
    files = {a["file"]: a["status"] for a in report["manifest"]["artifacts"]}
    assert files == {"model_fp32.onnx": "ok", "model_int8-dynamic.onnx": "ok"}
    for name in ("pruned.pt", "compress.json", "compress.md", "manifest.json", "model_fp32.onnx"):
        assert (tmp_path / name).is_file(), name
    table = (tmp_path / "compress.md").read_text()
    assert "| unpruned, fp32 eager |" in table and "| model_int8-dynamic.onnx (ok) |" in table
    assert json.loads((tmp_path / "compress.json").read_text())["stages"]["export"]["manifest"] == "manifest.json"

    # pruned.pt rebuilds the pruned network on a fresh model: it computes what the fp32 file was verified against
    rebuilt = load_compressed(tiny_vit(seed=5), tmp_path)
    assert (rebuilt.embed_dim, rebuilt.blocks[0].mlp.fc1.out_features) == (32, 128)  # 64 and 256, halved
    fresh = copy.deepcopy(model)
    pruned_out = rebuilt(images[:4])
    assert pruned_out.shape == (4, 10)
    assert not torch.allclose(pruned_out, fresh.eval()(images[:4]))


def test_an_interrupted_run_resumes_from_its_finished_stages(tmp_path, monkeypatch):
    import pqv_lightning.compress as mod

    model, (images, labels) = tiny_vit(), _data()
    config = _config(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "export_mobile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress(model, images, config, validation=[(images[:64], labels[:64])])
    state = json.loads((tmp_path / "compress.json").read_text())
    assert "prune" in state["stages"] and "export" not in state["stages"]
    assert (tmp_path / "pruned.pt").is_file() and not (tmp_path / "manifest.json").exists()
    monkeypatch.undo()

    def no_pruning(self, *args, **kwargs):
        raise AssertionError("the pruned network was kept: no event may run again")

    monkeypatch.setattr(StructuredPruner, "step", no_pruning)
    report = compress(model, images, config, validation=[(images[:64], labels[:64])])
    assert report["stages"]["prune"] == state["stages"]["prune"]
    assert [a["status"] for a in report["manifest"]["artifacts"]] == ["ok", "ok"]
    # a finished run called again does nothing but read it back
    monkeypatch.setattr(mod, "export_mobile", interrupted)
    assert compress(model, images, config, validation=[(images[:64], labels[:64])])["table"] == report["table"]


def test_a_folder_of_another_run_needs_overwrite(tmp_path):
    model, (images, _) = tiny_vit(), _data()
    compress(model, images, _config(tmp_path))
    with pytest.raises(ConfigError, match="holds a compress run of other inputs; pass overwrite=True"):
        compress(model, images, _config(tmp_path, pruning_ratio=0.25))
    config = _config(tmp_path, pruning_ratio=0.25)
    config.export.overwrite = True
    report = compress(model, images, config)
    assert report["stages"]["prune"]["ratio_reached"] == pytest.approx(0.25, abs=0.05)
    (other := tmp_path / "other").mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        compress(model, images, _config(other))
    assert (other / "notes.txt").read_text() == "mine"


def test_a_gradient_criterion_uses_labelled_calibration(tmp_path):
    model, (images, labels) = tiny_vit(), _data()
    batches = list(zip(images.split(64), labels.split(64), strict=True))
    report = compress(model, batches, _config(tmp_path, importance="taylor"))
    assert report["stages"]["prune"]["events"][0]["statistics_steps"] == 4
    with pytest.raises(ConfigError, match=r"importance='taylor' reads gradients.*\['l1', 'l2', 'random'\]"):
        compress(model, images, _config(tmp_path / "x", importance="taylor"))


@pytest.mark.parametrize(
    "calibration, fragments",
    [
        (torch.randn(256, 3, 32, 32), ["images of shape [3, 32, 32] do not fit VisionTransformer", "[1, 32, 32]"]),
        (torch.randn(40, 1, 32, 32), ["calibration has 40 images", "'head' (64 inputs) needs at least 64"]),
        (torch.full((256, 1, 32, 32), float("nan")), ["calibration contains NaN"]),
        ("images.pt", ["calibration must be a tensor of images"]),
        (torch.zeros(256, 1, 32, 32, dtype=torch.uint8), ["dtype torch.uint8", "float image tensors"]),
        ([], ["calibration holds no images"]),
    ],
)
def test_bad_calibration_is_refused_before_any_work(tmp_path, calibration, fragments):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        compress(tiny_vit(), calibration, _config(out))
    for f in fragments:
        assert f in str(info.value), str(info.value)
    assert not out.exists()


def test_bad_options_are_named(tmp_path):
    images, _ = _data()
    with pytest.raises(ConfigError, match="calibration_images=0"):
        compress(tiny_vit(), images, CompressConfig(calibration_images=0))
    with pytest.raises(ConfigError, match="formats"):
        compress(tiny_vit(), images, CompressConfig(export=quick_export_config(tmp_path, formats=["tflite"])))
    with pytest.raises(ConfigError, match="no registered adapter|not supported|adapter"):
        compress(torch.nn.Linear(4, 4), images, _config(tmp_path))


# ---------------------------------------------------------------------------------------------- pqv compress
def _cli_inputs(tmp_path):
    ckpt = save_vit_checkpoint(tiny_vit(), tmp_path / "tiny.pt")
    images, labels = _data(128)
    torch.save(images, tmp_path / "calib.pt")
    torch.save({"images": images[:64], "labels": labels[:64]}, tmp_path / "val.pt")
    return ckpt


def test_pqv_compress_end_to_end_on_tensor_files(tmp_path, capsys):
    ckpt = _cli_inputs(tmp_path)
    argv = [
        "compress",
        "--checkpoint",
        str(ckpt),
        "--calibration",
        str(tmp_path / "calib.pt"),
        "--validation",
        str(tmp_path / "val.pt"),
        "--ratio",
        "0.5",
        "--formats",
        "onnx",
        "--precisions",
        "fp32",
        "--rank",
        "none",
        "--output-dir",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| pruned, fp32 eager |" in out and "model_fp32.onnx (ok)" in out
    report = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert report["stages"]["accuracy"]["images"] == 64
    assert report["stages"]["prune"]["config"]["importance"] == "l2"  # CompressConfig's default, not restated
    # the same command again resumes (everything finished: nothing is redone)
    mtime = (tmp_path / "out" / "pruned.pt").stat().st_mtime_ns
    assert main(argv) == 0
    assert (tmp_path / "out" / "pruned.pt").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--model", "vit_small_patch16_224"], ["--checkpoint or --model, not both"]),
        (["--weights", "w.pt"], ["--weights and --pretrained go with --model"]),
        (["--ratio", "1.5"], ["pruning_ratio=1.5"]),
        (["--calibration", "nowhere"], ["--calibration nowhere: no such file or folder"]),
        (["--formats", "tflite"], ["--formats", "tflite"]),
        (["--max-accuracy-drop", "0.5", "--ratio", "0.3"], ["not allowed with argument"]),
        (["--max-accuracy-drop", "-1"], ["max_accuracy_drop=-1.0"]),
        (["--max-accuracy-drop", "0.5"], ["max_accuracy_drop=0.5 needs labelled validation data"]),
    ],
)
def test_pqv_compress_bad_input_is_one_line(tmp_path, capsys, extra, fragments):
    ckpt = _cli_inputs(tmp_path)
    argv = ["compress", "--checkpoint", str(ckpt), "--calibration", str(tmp_path / "calib.pt"), *extra]
    argv += ["--output-dir", str(tmp_path / "out")]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own checks (choices) exit from the parser
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pqv") and "error: " in err[-1], err
    for f in fragments:
        assert f in err[-1], err[-1]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- accuracy floor
def _floor_config(out, drop, **kw):
    config = _config(out)
    return CompressConfig(pruning=config.pruning, export=config.export, max_accuracy_drop=drop, **kw)


def test_the_accuracy_floor_finds_the_largest_ratio_within_the_drop(tmp_path, monkeypatch):
    import pqv_lightning.compress as mod

    # accuracy = the share of the embedding kept (the unpruned model: 100 %), so the floor is a known ratio
    monkeypatch.setattr(mod, "_accuracy", lambda network, val: network.embed_dim / 64)
    model, (images, labels) = tiny_vit(), _data()
    report = compress(model, images, _floor_config(tmp_path, 30.0), validation=[(images[:64], labels[:64])])
    search = report["stages"]["search"]
    assert search["unpruned"] == 1.0
    assert 0.3 - mod.SEARCH_RESOLUTION <= search["ratio"] <= 0.3 + 1e-9
    assert len(search["trials"]) == 6  # 0.9, then bisection to within 1/32
    assert all((t["accuracy"] >= 0.7) == (t["ratio"] <= search["ratio"]) for t in search["trials"].values())
    assert report["stages"]["prune"]["config"]["pruning_ratio"] == search["ratio"]
    assert "Accuracy floor: at most 30.0 points below the unpruned 100.00 %" in report["table"]


def test_an_accuracy_floor_no_ratio_meets_says_what_the_smallest_trial_reached(tmp_path, monkeypatch):
    import pqv_lightning.compress as mod

    monkeypatch.setattr(mod, "_accuracy", lambda network, val: 1.0 if network.embed_dim == 64 else 0.5)
    images, labels = _data()
    with pytest.raises(
        ConfigError, match=r"no channel ratio keeps .* the smallest ratio tried, 0\.0[0-9]+, reached 50\.00 %"
    ):
        compress(tiny_vit(), images, _floor_config(tmp_path, 1.0), validation=[(images[:64], labels[:64])])


def test_an_accuracy_floor_needs_labelled_validation_and_no_budget(tmp_path):
    images, _ = _data()
    with pytest.raises(ConfigError, match=r"max_accuracy_drop=0\.5 needs labelled validation data"):
        compress(tiny_vit(), images, _floor_config(tmp_path / "a", 0.5))
    with pytest.raises(ConfigError, match=r"needs labelled validation data"):
        compress(tiny_vit(), images, _floor_config(tmp_path / "b", 0.5), validation=images[:64])
    budget = CompressConfig(pruning=PruningConfig(target_macs=0.5), max_accuracy_drop=0.5)
    with pytest.raises(ConfigError, match=r"give it or a budget \(target_macs=0\.5\), not both"):
        compress(tiny_vit(), images, budget)
    with pytest.raises(ConfigError, match="max_ratio=1"):
        compress(tiny_vit(), images, CompressConfig(max_ratio=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
