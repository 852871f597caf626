"""Faults: a full disk, a killed export, file modes; pruned timm models stay whole timm models."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pqv_lightning.export import TARGETS, MobileExportConfig, export_mobile
from pqv_lightning.export.core import ExportFailedError, _best_entry
from pqv_lightning.pruning import PruningConfig, StructuredPruner, count_macs, prune_once

from conftest import quick_export_config, tiny_vit

EXAMPLE = torch.randn(1, 1, 32, 32)


def _config(out, **kw) -> MobileExportConfig:
    return quick_export_config(out, **{"precisions": ["fp32"], "formats": ["ptl"], "warmup": 0, "rank": "none", **kw})


def _consistent(out: Path) -> dict:
    """The folder holds exactly what its manifest describes: every ok file exists, no other model file,
    no hidden temporary file or timing folder."""
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {a["file"] for a in manifest["artifacts"] if a["status"] == "ok"}
    listed |= {c for a in manifest["artifacts"] if a["status"] == "ok" for c in a.get("companions", [])}
    present = {p.name for p in out.iterdir() if p.name != "manifest.json"}
    assert present == listed, (present, listed)
    return manifest


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    _unmount(mount)


def _unmount(mount: Path) -> None:
    """Unmount; lazily when a runtime still maps a file there (OpenVINO keeps its weights mapped), so
    that no mount outlives the test."""
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("fmt", [f for f in TARGETS.names() if TARGETS[f].missing() is None])
def test_enospc_on_an_artifact_leaves_a_consistent_folder(small_tmpfs, fmt):
    """A real full disk (a 96 KiB tmpfs) while writing a ~250 KiB artifact: it is marked skipped with the
    reason (no format's writer may take the process down), no temporary file stays, and the manifest
    describes the folder."""
    out = small_tmpfs / "out"
    with pytest.warns(UserWarning, match="skipped"):
        manifest = export_mobile(tiny_vit(depth=1), EXAMPLE, _config(out, formats=[fmt]))
    (entry,) = manifest["artifacts"]
    assert entry["status"] == "skipped" and entry["reason"].startswith("export failed"), entry["reason"]
    # OpenVINO's C++ writer reports only "iostream error"; the others name the full disk
    assert fmt == "openvino" or "no space left" in entry["reason"].lower(), entry["reason"]
    assert _consistent(out) == manifest


def test_enospc_on_the_manifest_of_a_real_tmpfs(tmp_path):
    """A tmpfs just large enough for the artifact: the artifact is written, the manifest is not."""
    export_mobile(tiny_vit(depth=1), EXAMPLE, _config(tmp_path / "ref"))
    pages = -(-(tmp_path / "ref" / "model_fp32.ptl").stat().st_size // 4096)
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={pages * 4096}", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        with pytest.raises(ExportFailedError, match=r"manifest.json .*No space left.*removed \['model_fp32.ptl'\]"):
            export_mobile(tiny_vit(depth=1), EXAMPLE, _config(mount / "out"))
        assert list((mount / "out").iterdir()) == []
    finally:
        _unmount(mount)


def test_enospc_on_the_manifest_removes_what_it_would_describe(tmp_path, monkeypatch):
    import pqv_lightning.export.core as core

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(core, "atomic_write_text", full_disk)
    out = tmp_path / "out"
    with pytest.raises(
        ExportFailedError,
        match=r"could not write .*manifest.json .*No space left.*removed "
        r"\['model_fp32.ptl'\]",
    ):
        export_mobile(tiny_vit(depth=1), EXAMPLE, _config(out))
    assert list(out.iterdir()) == []  # no artifact without its manifest, no temporary file


KILLED_EXPORT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_vit
    import pqv_lightning.export.core as core
    from pqv_lightning.export import TARGETS, MobileExportConfig, export_mobile

    stage = {stage!r}
    if stage == "verify":      # inside the second artifact: its staged file is on disk
        calls = []
        real = core._verify
        def verify(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                print("READY", flush=True); time.sleep(600)
            return real(*a, **k)
        core._verify = verify
    else:                      # inside the ranking: its working folder holds a copy of the model
        def round_robin(*a, **k):
            print("READY", flush=True); time.sleep(600)
        core.round_robin = round_robin
    export_mobile(tiny_vit(depth=1), torch.randn(1, 1, 32, 32), MobileExportConfig(
        precisions=["fp32", "int8-dynamic"], formats=["ptl"], engines=["x86"], output_dir={out!r}, repeats=2,
        warmup=0, measure_memory=False, rank="round-robin" if stage == "rank" else "none"))
""")


@pytest.mark.slow  # fast tier <= 5 min: a killed export process, then two exports (~30 s each)
@pytest.mark.parametrize("stage", ["verify", "rank"])
def test_sigkill_mid_export_then_rerun(tmp_path, stage):
    out = tmp_path / "out"
    script = KILLED_EXPORT.format(tests=str(Path(__file__).parent), stage=stage, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden, "the kill should have left a temporary file or timing folder behind"
    finished = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if stage == "verify":  # files are named only after all are built and each is timed: none was
        assert finished == []
        manifest = export_mobile(tiny_vit(depth=1), EXAMPLE, _config(out))  # leftovers alone don't count
    else:
        assert finished == ["manifest.json", "model_fp32.ptl", "model_int8-dynamic_x86.ptl"]
        # a rerun without overwrite: the finished artifacts are the user's, so it refuses
        with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
            export_mobile(tiny_vit(depth=1), EXAMPLE, _config(out))
        manifest = export_mobile(tiny_vit(depth=1), EXAMPLE, _config(out, overwrite=True))
    assert _consistent(out) == manifest and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_rerun_cleans_leftovers_in_an_otherwise_empty_folder(tmp_path):
    out = tmp_path / "out"
    (out / ".rank-abc123").mkdir(parents=True)
    (out / ".rank-abc123" / "fp32_eager.pt").write_bytes(b"x" * 1000)
    (out / ".build-def456").mkdir()
    (out / ".build-def456" / "context.pt").write_bytes(b"x" * 1000)
    (out / ".model_fp32.ptl.k2j3.ptl").write_bytes(b"half")
    manifest = export_mobile(tiny_vit(depth=1), EXAMPLE, _config(out))  # not refused: nothing of the user's there
    assert _consistent(out) == manifest


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        export_mobile(tiny_vit(depth=1), EXAMPLE, _config(tmp_path / "out"))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"model_fp32.ptl": 0o640, "manifest.json": 0o640}, modes


def test_best_under_contention_says_so():
    artifact = {"file": "m.pte", "format": "pte", "runtime": "executorch", "precision": "int8", "engine": None}
    quiet = {"median_ms": 2.0, "p90_ms": 2.2, "contention_max": 0.05}
    busy = {"median_ms": 2.0, "p90_ms": 2.2, "contention_max": 0.9}
    assert "caveat" not in _best_entry(artifact, quiet, 3.0, "round-robin", {"contention_max": 0.1})
    flagged = _best_entry(artifact, quiet, 374.0, "round-robin", {"contention_max": 0.95})
    assert "0.95 CPUs busy while fp32 eager was timed" in flagged["caveat"]
    assert "this file" in _best_entry(artifact, busy, 3.0, "round-robin", None)["caveat"]
    assert flagged["statistic"] == "median / median"


# ------------------------------------------------------------------------------------- whole timm models
def test_a_pruned_vit_is_a_whole_timm_model_again():
    model = tiny_vit()
    prune_once(model, PruningConfig(importance="l2", pruning_ratio=0.25))
    width = model.patch_embed.proj.out_channels
    assert width == 48 and model.embed_dim == model.num_features == model.head_hidden_size == width
    model.reset_classifier(5)  # what a user does to fine-tune the pruned model on a new dataset
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 5)
    assert model.forward_features(x).shape[-1] == width and model.get_classifier().in_features == width
    event = prune_once(model, PruningConfig(importance="l2", pruning_ratio=0.25))  # a second round
    assert model.embed_dim == model.patch_embed.proj.out_channels == 36
    assert event.macs_after < event.macs_before and model(x).shape == (2, 5)


def test_macs_before_after_a_resume_are_the_pruned_models():
    example = torch.randn(1, 1, 32, 32)
    config = PruningConfig(importance="l2", pruning_ratio=0.5, iterative_steps=2)
    first = tiny_vit()
    pruner = StructuredPruner(first, config)
    after_one = pruner.step().macs_after
    resumed = StructuredPruner(tiny_vit(), config)
    resumed.load_state_dict(pruner.state_dict())
    event = resumed.step()
    assert event.macs_before == after_one == count_macs(first, example)
    assert event.macs_before < resumed.initial_macs


def test_cli_help_imports_no_heavy_module():
    """What makes ``pqv --help`` fast; its wall time is measured in benchmarks/cli_startup.py."""
    code = (
        "import sys\nfrom pqv_lightning.apps.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'lightning', 'timm', 'torch_pruning') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout[-300:]
