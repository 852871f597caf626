"""The ``pqv`` command line: each command end to end at a tiny size, and one-line errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pqv_lightning.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pqv: error: "), err
    for f in fragments:
        assert f in err[0], err[0]


@pytest.mark.slow
def test_bench_times_files_and_models_round_robin_with_json_and_csv(tmp_path, capsys, exported_tiny):
    out, manifest = exported_tiny
    if not (out / "model_int8-dynamic.onnx").is_file():
        pytest.skip("needs the onnx extra: pip install 'pqv-lightning[onnx]'")
    files = [out / "model_int8-dynamic.onnx", out / "model_int8-dynamic.xml", out / "model_int8-dynamic_x86.ptl"]
    files = [f for f in files if f.is_file()]  # the OpenVINO IR where the extra is installed
    argv = [
        "bench",
        "vit_test_tiny",
        *map(str, files),
        "--rounds",
        "2",
        "--calls",
        "2",
        "--warmup",
        "1",
        "--json",
        str(tmp_path / "b.json"),
        "--csv",
        str(tmp_path / "b.csv"),
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "input [1, 1, 32, 32]" in stdout and "baseline: vit_test_tiny (fp32 eager)" in stdout
    result = json.loads((tmp_path / "b.json").read_text())
    rows = {r["candidate"]: r for r in result["results"]}
    assert list(rows) == ["vit_test_tiny (fp32 eager)", *(f.name for f in files)]
    assert rows["vit_test_tiny (fp32 eager)"]["speedup_vs_baseline"] == 1.0
    for r in rows.values():
        assert r["calls"] == 4 and 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["peak_rss_mb"] > r["load_and_inference_mb"] > 0
        assert r["retaken"] >= 0 and (r["contention_max"] is None or r["contention_max"] >= 0)
    assert result["max_contention"] == 0.2 and result["retries"] == 2 and "| contention CPUs | retaken |" in stdout
    with open(tmp_path / "b.csv") as fh:
        assert [r["candidate"] for r in csv.DictReader(fh)] == list(rows)
    fastest = min(rows, key=lambda label: rows[label]["median_ms"])
    assert result["best"] == fastest and f"fastest: {fastest} (" in stdout


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["bench", "no_such_model_xyz"], ["no_such_model_xyz: not a file", "unknown model_name"]),
        (["bench", "missing.pte"], ["missing.pte: no such file"]),
        (["bench", "vit_test_tiny", "--baseline", "other"], ["--baseline 'other' is not one of"]),
        (["bench", "vit_test_tiny", "--max-contention", "-1"], ["max_contention=-1.0", "a number of CPUs >= 0"]),
        (["demo", "--data-dir", "/no/such/folder"], ["--data-dir /no/such/folder: no such folder"]),
        (["demo", "--ratio", "1.5"], ["--ratio 1.5: pruning_ratio=1.5 must be a finite number >= 0 and < 1"]),
        (["demo", "--checkpoint", "nope.pt"], ["--checkpoint nope.pt: no such file"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragments):
    _one_line_error(capsys, argv, *fragments)


@pytest.mark.slow  # fast tier <= 5 min on 2 cores (issue 29)
def test_an_unexpected_error_keeps_its_traceback_and_is_not_bad_input(monkeypatch, capsys):
    import pqv_lightning.apps.demo as demo

    def deep_bug(args):
        raise ValueError("internal: shapes 3 and 4 disagree")  # e.g. a bug deep in training or export

    monkeypatch.setattr(demo, "run_demo", deep_bug)
    with pytest.raises(ValueError, match="internal: shapes"):  # propagates: Python prints it and exits 1
        main(["demo"])
    assert "pqv: error" not in capsys.readouterr().err
    env = {**__import__("os").environ, "PQV_FMNIST_CHECKPOINT": "/no/such/vit.pt"}
    proc = subprocess.run(
        [sys.executable, "-m", "pqv_lightning", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "pqv: error: $PQV_FMNIST_CHECKPOINT=/no/such/vit.pt: no such file"
    )


def test_demo_help_claims_only_what_the_demo_reads(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ImageFolder" not in text  # the demo reads Fashion-MNIST IDX files only
    assert "Fashion-MNIST folder with the four IDX *-ubyte.gz files" in text
    assert "$PQV_FMNIST_CHECKPOINT, else the bundled one" in text


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {"reconstruct": True, "reconstruct_layers": "all"}),
        (["--widths-for", "openvino"], {"reconstruct": True, "reconstruct_layers": "all", "widths_for": "openvino"}),
    ],
)
def test_demo_widths_for_reaches_the_pruning_callback(monkeypatch, argv, expected):
    from pqv_lightning.apps import recipes

    class Reached(Exception):
        pass

    seen = []

    def fake(checkpoint, *, label, pruning_ratio=None, **kwargs):
        seen.append(kwargs.get("pruning_kwargs"))
        if pruning_ratio != 0.0:  # unset: the default ratio
            raise Reached
        return recipes.FinetuneResult(label, "-", 0.0, 0, 0, 0.9, 1, 1, 0.0)

    monkeypatch.setattr(recipes, "finetune_with_pruning", fake)
    with pytest.raises(Reached):
        main(["demo", "--export-dir", "", "--plots-dir", "", *argv])
    assert seen[-1] == expected


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], None),  # recipes.DEMO_BUDGET
        (
            ["--train-subset", "8192", "--accumulate", "8", "--epochs", "2", "--events", "4"],
            {"epochs": 2, "train_subset": 8192, "accumulate_batches": 8, "iterative_steps": 4},
        ),
    ],
)
def test_demo_budget_comes_from_demo_budget_unless_given(monkeypatch, capsys, argv, expected):
    from pqv_lightning.apps import recipes

    class Reached(Exception):
        pass

    seen = []

    def fake(checkpoint, *, label, pruning_ratio=None, **kwargs):
        if pruning_ratio == 0.0:
            return recipes.FinetuneResult(label, "-", 0.0, 0, 0, 0.9, 1, 1, 0.0)
        seen.append({k: kwargs[k] for k in ("epochs", "train_subset", "accumulate_batches", "iterative_steps")})
        raise Reached

    monkeypatch.setattr(recipes, "finetune_with_pruning", fake)
    with pytest.raises(Reached):
        main(["demo", "--export-dir", "", "--plots-dir", "", *argv])
    assert seen == [expected or recipes.DEMO_BUDGET]
    with pytest.raises(SystemExit):  # --help states the values it defaults to
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, key in (
        ("--epochs", "epochs"),
        ("--train-subset", "train_subset"),
        ("--accumulate", "accumulate_batches"),
    ):
        assert f"recipes.DEMO_BUDGET: {recipes.DEMO_BUDGET[key]})" in text.split(option + " ", 2)[-1], option


def test_bad_file_type_and_empty_data_folder(tmp_path, capsys):
    (tmp_path / "model.tflite").write_bytes(b"x")
    _one_line_error(capsys, ["bench", str(tmp_path / "model.tflite")], "unsupported file type '.tflite'")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["demo", "--data-dir", str(tmp_path / "empty")], "Fashion-MNIST files", "not found")


def _run_pqv(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pqv_lightning", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
        check=False,
        env={**__import__("os").environ, "WANDB_MODE": "disabled"},
    )


@pytest.mark.slow
def test_fit_runs_a_tiny_config_with_both_callbacks(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 4
  limit_val_batches: 1
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: pqv_lightning.StructuredPruning
      init_args: {{importance: taylor, pruning_ratio: 0.5, iterative_steps: 1, accumulate_batches: 2,
                  interval: step, start: 0, frequency: 2, widths_for: openvino}}
    - class_path: pqv_lightning.MobileExport
      init_args: {{precisions: [fp32], formats: [onnx], output_dir: {tmp_path / "export"}, repeats: 1,
                  measure_memory: false, rank: in-process, min_top1_agreement: 0.0}}
model:
  model_name: vit_test_tiny
data:
  class_path: pqv_lightning.data.FashionMNISTDataModule
  init_args: {{batch_size: 16, train_subset: 64}}
""")
    proc = _run_pqv("fit", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    (entry,) = manifest["artifacts"]
    assert entry["status"] == "ok" and entry["file"] == "model_fp32.onnx"
    assert manifest["input"]["shape"] == [1, 1, 32, 32]


@pytest.mark.slow  # fast tier <= 5 min on 2 cores: a real pqv fit process (~19 s)
def test_fit_with_a_malformed_config_fails_without_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  max_steps: [not, a, number\n")
    proc = _run_pqv("fit", "--config", str(config), cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "error" in proc.stderr.lower()


@pytest.mark.slow  # fast tier <= 5 min on 2 cores: a real pqv fit process (~19 s)
def test_fit_with_a_value_a_callback_refuses_is_one_error_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n  - class_path: pqv_lightning.StructuredPruning\n"
        "    init_args: {importance: fisher}\nmodel: {model_name: vit_test_tiny}\n"
        "data: {class_path: pqv_lightning.data.FashionMNISTDataModule}\n"
    )
    proc = _run_pqv("fit", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "pqv: error: importance='fisher' is not registered; allowed: ['taylor', 'hessian'" in proc.stderr


@pytest.mark.parametrize("name", ["fmnist_prune.yaml", "imagefolder_deit.yaml", "fmnist_wandb.yaml"])
def test_shipped_configs_parse(tmp_path, name):
    from pqv_lightning.apps.lightning_cli import run_cli

    args = ["--config", str(ROOT / "examples" / "configs" / name), f"--trainer.default_root_dir={tmp_path}"]
    if name == "imagefolder_deit.yaml":
        args += [f"--data.init_args.root={tmp_path}", "--model.model_name=vit_test_tiny", "--model.pretrained=false"]
    else:
        args += ["--model.pretrained=false", "--model.model_name=vit_test_tiny"]
    cli = run_cli(args, run=False)
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"StructuredPruning", "MobileExport"} <= names


def test_python_dash_m_and_console_script_show_the_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "pqv_lightning", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and "{demo,fit,compress,bench,sweep,coverage,headline}" in proc.stdout
    script = Path(sys.executable).parent / "pqv"
    if script.exists():  # installed with pip install -e .
        proc = subprocess.run(
            [str(script), "bench", "no_such_model_xyz"], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 2 and proc.stderr.startswith("pqv: error: no_such_model_xyz")
