"""``pqv sweep --quick`` end to end, resuming, and its bad input."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

import pqv_lightning.apps.sweep as sweep_mod
from pqv_lightning.apps.cli import main
from pqv_lightning.apps.sweep import CellStore
from pqv_lightning.apps.sweep_report import splice_between_markers
from pqv_lightning.models import save_vit_checkpoint

from conftest import tiny_vit


@pytest.fixture
def checkpoint(tmp_path):
    return str(save_vit_checkpoint(tiny_vit(depth=1), tmp_path / "tiny.pt"))


def _small_grid(mp) -> None:
    """The quick sweep's grid in these tests: 0 % and 50 %, engines at 50 %."""
    mp.setattr(sweep_mod.QUICK, "ratios", [0.0, 0.5])
    mp.setattr(sweep_mod.QUICK, "engine_ratio", 0.5)


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """One ``pqv sweep --quick`` run shared by the tests below (two models, 0 % and 50 %): its output
    folder, its argv without ``--out`` and what it printed. Tests that change the folder copy it."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("quick_sweep")
    ckpt = str(save_vit_checkpoint(tiny_vit(depth=1), root / "tiny.pt"))
    argv = ["sweep", "--quick", "--checkpoint", ckpt, "--models", "vit_test_tiny", "vit_tiny_fmnist"]
    out, printed = root / "sweep", io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        _small_grid(mp)
        assert main([*argv, "--out", str(out)]) == 0
    return out, argv, printed.getvalue()


@pytest.fixture
def sweep_copy(quick_sweep, tmp_path, monkeypatch):
    import shutil

    out, argv, _ = quick_sweep
    _small_grid(monkeypatch)
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    return copy, [*argv, "--out", str(copy)]


@pytest.mark.slow
def test_quick_sweep_writes_every_cell_figure_and_table(quick_sweep):
    out, _, printed = quick_sweep
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    kinds = [c["key"].split("|")[0] for c in cells]
    assert kinds.count("latency") == 4 and kinds.count("engines") == 1 and kinds.count("gemm") == 1
    # taylor at the importance ratio is the accuracy cell at that ratio: computed once, shared
    # (seed 0; seed 1 gets its own taylor cell): 2 criteria x 2 seeds - 1 shared
    assert kinds.count("accuracy") == 2 and kinds.count("importance") == 3
    results = json.loads((out / "results.json").read_text())["results"]
    gemm = results["gemm"][0]
    assert gemm["fp32_gops"] > 0 and gemm["int8_gops"] > 0
    lat = results["latency"]
    assert {r["precision"] for r in lat} == {"fp32", "fp16", "int8-dynamic"}
    assert {(r["model"], r["ratio"]) for r in lat} == {
        (m, r) for m in ("vit_test_tiny", "vit_tiny_fmnist") for r in (0.0, 0.5)
    }
    pruned = {r["model"]: r["params"] for r in lat if r["ratio"] == 0.5}
    unpruned = {r["model"]: r["params"] for r in lat if r["ratio"] == 0.0}
    assert all(pruned[m] < unpruned[m] for m in pruned)
    for r in lat:
        assert r["median_ms"] > 0 and 0 < r["fraction_of_host_gemm"] and r["achieved_gops"] > 0
        if r["format"] != "eager":
            assert r["peak_rss_mb"] > 0 and r["cosine"] > 0.9
    assert {r["engine"] for r in results["engines"]} >= {"x86", "onednn", None}
    # every ratio is timed against the unpruned fp32 eager model in its own cell's round-robin
    for r in lat + results["engines"]:
        assert r["x_vs_unpruned_eager"] == pytest.approx(r["unpruned_eager_ms"] / r["median_ms"])
        if r["ratio"] == 0 and r["format"] == "eager":
            assert r["x_vs_unpruned_eager"] == 1.0
    assert len({r["unpruned_eager_ms"] for r in lat if r["model"] == "vit_test_tiny"}) == 2  # one per cell
    acc = results["accuracy"]
    assert {r["precision"] for r in acc} == {"fp32 eager", "fp32", "fp16", "int8-dynamic"}
    assert all(0 <= r["test_acc"] <= 1 for r in acc)
    imp = results["importance"]
    assert sorted((r["importance"], r["seed"], r["precision"]) for r in imp) == [
        (c, seed, p) for c in ("l2", "taylor") for seed in (0, 1) for p in ("fp32", "fp32 eager")
    ]
    taylor = next(r for r in imp if r["importance"] == "taylor" and r["seed"] == 0)
    assert taylor["test_acc"] == next(r["test_acc"] for r in acc if r["ratio"] == 0.5)
    for name in (
        "fig2_latency_memory.png",
        "fig4_accuracy.png",
        "fig5_importance.png",
        "fig6_models.png",
        "fig7_engines.png",
    ):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    with open(out / "sweep.csv") as fh:
        assert len(list(csv.DictReader(fh))) == sum(len(rows) for rows in results.values())
    assert "Measured GEMM throughput" in printed and "| vit_test_tiny |" in printed
    assert gemm["host"]["logical_cpus"] >= 1 and gemm["host"]["torch"]


@pytest.mark.slow
def test_quick_sweep_summary_is_what_the_results_page_publishes(quick_sweep, tmp_path):
    out, _, _ = quick_sweep
    lat = json.loads((out / "results.json").read_text())["results"]["latency"]
    # the published summary: headline ratio per model, one line per (model, ratio) in each of the latency,
    # fastest-file (the quick sweep's .onnx int8 files), memory and efficiency tables
    summary = (out / "summary.md").read_text()
    assert "The paper's headline configuration" in summary and "**Fastest file per cell**" in summary
    for model in ("vit_test_tiny", "vit_tiny_fmnist"):
        assert summary.count(f"| {model} | 0 % |") == 4 and summary.count(f"| {model} | 50 % |") == 4
        best = min(
            (r for r in lat if r["model"] == model and r["ratio"] == 0.5 and r["precision"] == "int8-dynamic"),
            key=lambda r: r["median_ms"],
        )
        # within the 50 % cell: its own unpruned fp32 eager timing, not the 0 % cell's
        assert f"| {best['unpruned_eager_ms']:.1f} ms |" in summary
        assert f"**{best['unpruned_eager_ms'] / best['median_ms']:.2f}x**" in summary
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- sweep:begin -->\nold numbers\n<!-- sweep:end -->\n\nafter\n")
    assert _publisher().main(["--sweep", str(out), "--readme", str(readme), "--dest", str(tmp_path / "pub")]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and summary.strip() in text and text.endswith("after\n")
    assert "![fig2_latency_memory](pub/fig2_latency_memory.png)" in text
    assert (tmp_path / "pub" / "fig7_engines.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "pub" / "sweep.csv").read_text() == (out / "sweep.csv").read_text()


@pytest.mark.slow
def test_published_cells_let_a_new_checkout_continue_without_recomputing(quick_sweep, tmp_path, monkeypatch, capsys):
    # runs/ is not in git: the published cells.jsonl is what a new checkout starts from
    import shutil

    out, argv, _ = quick_sweep
    _small_grid(monkeypatch)
    readme = tmp_path / "results.md"
    readme.write_text("<!-- sweep:begin -->\n<!-- sweep:end -->\n")
    assert _publisher().main(["--sweep", str(out), "--readme", str(readme), "--dest", str(tmp_path / "pub")]) == 0
    assert (tmp_path / "pub" / "cells.jsonl").read_text() == (out / "cells.jsonl").read_text()
    fresh = tmp_path / "runs" / "sweep"
    fresh.mkdir(parents=True)
    shutil.copyfile(tmp_path / "pub" / "cells.jsonl", fresh / "cells.jsonl")

    def boom(*a, **k):
        raise AssertionError("a published cell was recomputed")

    for name in ("_latency_cell", "_accuracy_cell", "gemm_throughput"):
        monkeypatch.setattr(sweep_mod, name, boom)
    assert main([*argv, "--out", str(fresh)]) == 0
    assert "not run yet" not in capsys.readouterr().err
    assert (fresh / "summary.md").read_text() == (out / "summary.md").read_text()


@pytest.mark.slow
def test_quick_sweep_rerun_recomputes_nothing(sweep_copy, monkeypatch, capsys):
    out, argv = sweep_copy
    cells = (out / "cells.jsonl").read_text().splitlines()

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(sweep_mod, "_latency_cell", boom)
    monkeypatch.setattr(sweep_mod, "_accuracy_cell", boom)
    monkeypatch.setattr(sweep_mod, "gemm_throughput", boom)
    assert main(argv) == 0
    assert capsys.readouterr().err.count("cached ") == len(cells) + 1  # + the shared taylor cell


@pytest.mark.slow
def test_quick_sweep_report_only_names_the_missing_cell(sweep_copy, capsys):
    # --report-only with a cell missing: computes nothing, reports the rest and names the missing cell
    out, argv = sweep_copy
    cells = lines = (out / "cells.jsonl").read_text().splitlines()
    dropped = next(json.loads(line)["key"] for line in lines if line.startswith('{"key": "importance'))
    (out / "cells.jsonl").write_text("\n".join(line for line in lines if dropped not in line) + "\n")
    assert main([*argv, "--report-only"]) == 0
    err = capsys.readouterr().err
    assert err.count("cached ") == len(cells) - 1 + 1 and f"not run yet, skipped: {dropped}" in err
    for name in ("results.md", "summary.md"):
        assert (out / name).read_text().startswith(f"**Partial report**: 1 cell(s) not run yet: `{dropped}`")
    partial = json.loads((out / "results.json").read_text())["results"]["importance"]
    # l2 seed 0 dropped; taylor seed 0 still comes from the accuracy cell
    assert {(r["importance"], r["seed"]) for r in partial} == {("taylor", 0), ("taylor", 1), ("l2", 1)}
    assert "| l2 | " in (out / "results.md").read_text()  # the report aggregates what there is


def test_torn_last_line_is_ignored_and_the_cell_redone(tmp_path):
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps({"key": "a", "rows": [{"x": 1}]}) + "\n" + '{"key": "b", "ro')
    store = CellStore(path)
    assert "a" in store and "b" not in store


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["sweep", "--quick", "--models", "no_such_model_xyz"], "unknown model_name='no_such_model_xyz'"),
        (["sweep", "--quick", "--checkpoint", "missing.pt"], "checkpoint missing.pt: no such file"),
        (["sweep", "--quick", "--data-dir", "/no/such"], "--data-dir /no/such: no such folder"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, fragment):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pqv: error: ") and fragment in err[0], err


def _publisher():
    path = Path(__file__).resolve().parents[1] / "scripts" / "sweep_to_readme.py"
    spec = importlib.util.spec_from_file_location("sweep_to_readme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_splice_replaces_only_the_marked_block():
    text = "a\n<!-- sweep:begin -->\nold\n<!-- sweep:end -->\nb\n"
    assert splice_between_markers(text, "new\n") == "a\n<!-- sweep:begin -->\nnew\n<!-- sweep:end -->\nb\n"
    for bad in (
        "no markers",
        "<!-- sweep:end --> <!-- sweep:begin -->",
        "<!-- sweep:begin --><!-- sweep:begin --><!-- sweep:end -->",
    ):
        with pytest.raises(ValueError, match="expected one"):
            splice_between_markers(bad, "x")


def test_publishing_an_unfinished_sweep_fails_and_leaves_the_readme_alone(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- sweep:begin -->\nkeep\n<!-- sweep:end -->\n")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.md").write_text("partial")
    assert (
        _publisher().main(
            ["--sweep", str(tmp_path / "sweep"), "--readme", str(readme), "--dest", str(tmp_path / "pub")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no summary.md, results.json, sweep.csv" in err and readme.read_text().endswith("keep\n<!-- sweep:end -->\n")
    assert not (tmp_path / "pub").exists()


@pytest.mark.slow  # fast tier <= 5 min: a real sweep worker process (~40 s)
def test_a_failing_cell_worker_is_one_error_line_and_keeps_finished_cells(tmp_path, capsys):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "o"
    argv = ["sweep", "--quick", "--out", str(out), "--checkpoint", str(bad), "--experiments", "gemm", "accuracy"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pqv: error: sweep cell 'accuracy|") and "failed in its worker process" in err[-1]
    assert [json.loads(line)["key"] for line in (out / "cells.jsonl").read_text().splitlines()] == ["gemm|threads=2"]


def test_cell_keys_hold_every_setting_that_changes_a_number(tmp_path, checkpoint):
    import dataclasses
    import shutil

    base = dataclasses.replace(sweep_mod.QUICK, out_dir=str(tmp_path))

    def keys(**changes):
        config = dataclasses.replace(base, **{k: v for k, v in changes.items() if k != "ckpt"})
        return [(e, k) for e, k, _ in sweep_mod._cells(config, changes.get("ckpt", checkpoint))]

    reference = keys()
    # a one-format list keeps the keys of the one-format sweep (caches from before formats=[...] stay valid)
    assert all("|format=onnx|" in k for e, k in reference if e in ("latency", "accuracy", "importance"))
    assert all(
        "|format=onnx,openvino|" in k
        for e, k in keys(formats=["onnx", "openvino"])
        if e in ("latency", "accuracy", "importance")
    )
    computed = [k for _, k, compute in sweep_mod._cells(base, checkpoint) if compute is not None]
    assert len(set(computed)) == len(computed)  # no two cells share a key by accident
    for change, affected in [
        (dict(threads=1), {"gemm", "latency", "engines", "accuracy", "importance"}),
        (dict(rounds=5), {"latency", "engines"}),
        (dict(repeats=7), {"latency", "engines"}),
        (dict(precisions=["fp32"]), {"latency", "accuracy", "importance"}),  # importance shares taylor's cell
        # latency-only precisions leave the accuracy cells alone (they can be added to a finished sweep)
        (dict(latency_precisions=["fp32", "int8-static"]), {"latency"}),
        (dict(latency_formats=["pte", "onnx", "openvino"]), {"latency"}),
        (dict(verify_batches=3), {"accuracy", "importance"}),
        (dict(test_subset=128), {"accuracy", "importance"}),
        (dict(engine_ratio=0.25), {"engines"}),
        (dict(formats=["ptl"]), {"latency", "accuracy", "importance"}),
        (dict(recipe="v0.2"), {"accuracy", "importance"}),
        (dict(seeds=[0, 2]), {"importance"}),
    ]:
        changed = {e for (e, k), (_, old) in zip(keys(**change), reference) if k != old}
        assert changed == affected, change
    assert keys(latency_precisions=list(base.precisions)) == reference  # the same precisions: the same cells
    assert keys(latency_formats=list(base.formats)) == reference  # the same formats: the same cells
    # the checkpoint counts by content: a copy elsewhere is the same cell, another file is not
    shutil.copy(checkpoint, tmp_path / "copy.pt")
    assert keys(ckpt=str(tmp_path / "copy.pt")) == reference
    other = save_vit_checkpoint(tiny_vit(seed=1, depth=1), tmp_path / "other.pt")
    assert {e for (e, k), (_, old) in zip(keys(ckpt=str(other)), reference) if k != old} == {"accuracy", "importance"}


def test_importance_summary_is_mean_and_std_over_seeds_with_the_test_set_error():
    from pqv_lightning.apps.sweep_report import importance_summary

    rows = [
        {
            "importance": c,
            "seed": s,
            "precision": p,
            "test_acc": acc,
            "ratio": 0.25,
            "steps": 256,
            "params": 3e6,
            "test_images": 10_000,
        }
        for c, accs in (("taylor", (0.90, 0.91, 0.89)), ("l2", (0.88,)))
        for s, acc in enumerate(accs)
        for p in ("fp32 eager", "fp32", "int8-dynamic")
    ]  # a sweep cell's rows: the model and each file
    summary = {r["importance"]: r for r in importance_summary(rows)}
    assert summary["taylor"]["accs"] == pytest.approx([90.0, 91.0, 89.0])
    assert summary["taylor"]["mean"] == pytest.approx(90.0) and summary["taylor"]["std"] == pytest.approx(1.0)
    assert summary["taylor"]["se"] == pytest.approx(100 * (0.9 * 0.1 / 10_000) ** 0.5)
    assert summary["l2"]["accs"] == pytest.approx([88.0]) and summary["l2"]["std"] != summary["l2"]["std"]  # nan
    # a file-only row (no eager row for that seed) still counts, once
    extra = [{**rows[0], "seed": 7, "precision": "fp32", "test_acc": 0.95}]
    assert {r["importance"]: r for r in importance_summary(rows + extra)}["taylor"]["accs"] == pytest.approx(
        [90.0, 91.0, 89.0, 95.0]
    )


def test_fastest_file_per_cell_is_compared_with_onnx_runtime_int8_of_the_same_cell():
    from pqv_lightning.apps.sweep_report import fastest_per_cell, summary_markdown

    def row(model, ratio, fmt, precision, ms):
        return {
            "model": model,
            "ratio": ratio,
            "format": fmt,
            "precision": precision,
            "median_ms": ms,
            "x_vs_unpruned_eager": 200.0 / ms,
            "params": 1e6,
            "macs": 1e9,
            "peak_rss_mb": 100.0,
        }

    rows = [
        row("a", 0.25, "eager", "fp32", 100.0),
        row("a", 0.25, "pte", "int8-dynamic", 30.0),
        row("a", 0.25, "onnx", "int8-dynamic", 50.0),
        row("a", 0.25, "onnx", "int8-static", 40.0),
        row("a", 0.25, "openvino", "int8-static", 20.0),
        # another cell: ONNX Runtime is the fastest itself; eager rows never count as files
        row("a", 0.5, "eager", "fp32", 5.0),
        row("a", 0.5, "onnx", "int8-dynamic", 10.0),
        row("a", 0.5, "pte", "fp32", 12.0),
        row("b", 0.0, "pte", "int8-dynamic", 9.0),
    ]  # no .onnx int8 file: no comparison
    race = {(c["model"], c["ratio"]): c for c in fastest_per_cell(rows)}
    assert set(race) == {("a", 0.25), ("a", 0.5)}
    assert race["a", 0.25]["best"]["format"] == "openvino" and race["a", 0.25]["onnx_int8"]["median_ms"] == 40.0
    assert race["a", 0.25]["vs_onnx_int8"] == pytest.approx(0.5)
    assert race["a", 0.5]["best"]["format"] == "onnx" and race["a", 0.5]["vs_onnx_int8"] == pytest.approx(1.0)
    config = sweep_mod.SweepConfig(latency_formats=["pte", "onnx", "openvino"])
    text = summary_markdown({"gemm": [], "latency": rows, "engines": [], "accuracy": [], "importance": []}, config)
    assert "| a | 25 % | int8-static .openvino | 20.0 | 10.00x | 40.0 (int8-static) | 0.50x |" in text
    # a one-runtime sweep has no such table
    pte_only = [r for r in rows if r["format"] in ("eager", "pte")]
    assert fastest_per_cell(pte_only) == []


def test_unknown_recipe_and_bad_seeds_fail_before_any_cell(tmp_path, capsys):
    assert main(["sweep", "--quick", "--out", str(tmp_path), "--seeds", "1", "1"]) == 2
    assert "seeds=[1, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--quick", "--out", str(tmp_path), "--recipe", "nope"])
    with pytest.raises(SystemExit):
        main(["sweep", "--quick", "--out", str(tmp_path), "--latency-precisions", "int4"])
    import dataclasses

    for bad, fragment in (([], r"latency_precisions=\[\]: empty"), (["fp32", "int3"], r"unknown \[.int3.\]")):
        with pytest.raises(ValueError, match=fragment):
            sweep_mod.run_sweep(dataclasses.replace(sweep_mod.QUICK, out_dir=str(tmp_path), latency_precisions=bad))
    with pytest.raises(SystemExit):
        main(["sweep", "--quick", "--out", str(tmp_path), "--latency-formats", "tflite"])
    with pytest.raises(ValueError, match=r"latency_formats=\['pte', 'tflite'\]: unknown \['tflite'\]"):
        sweep_mod.run_sweep(
            dataclasses.replace(sweep_mod.QUICK, out_dir=str(tmp_path), latency_formats=["pte", "tflite"])
        )
    assert not (tmp_path / "cells.jsonl").exists()
