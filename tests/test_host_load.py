"""A busy host is measured, not guessed: every timed process records how many CPUs other work took
from it (``contention``), and ``round_robin`` retakes a measurement taken on a busy host."""

import os
import time
import warnings

import pytest
import torch

from pqv_lightning.errors import ConfigError
from pqv_lightning.export import benchmark
from pqv_lightning.export.benchmark import Candidate, HostLoad, busy_seconds, round_robin

linux = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="contention is read from Linux /proc/stat")


@pytest.fixture()
def fake_clocks(monkeypatch):
    """The host's busy CPU seconds, this process's CPU seconds and the wall clock, set by the test: the
    contention arithmetic is checked without depending on what else the host is doing."""
    clocks = {"host": 100.0, "own": 10.0, "wall": 1000.0}
    monkeypatch.setattr(HostLoad, "_host", staticmethod(lambda: clocks["host"]))
    monkeypatch.setattr(HostLoad, "_own", staticmethod(lambda: clocks["own"]))
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clocks["wall"])
    monkeypatch.setattr(benchmark.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(benchmark, "usable_cpus", lambda: 2)
    return clocks


def _advance(clocks, host: float, own: float, wall: float) -> None:
    clocks["host"] += host
    clocks["own"] += own
    clocks["wall"] += wall


def test_contention_counts_other_processes_not_this_one(fake_clocks):
    load = HostLoad().start()
    _advance(fake_clocks, host=2.0, own=2.0, wall=2.0)  # only this process worked: one CPU for 2 s
    assert load.contention(threads=2) == 0.0
    load = HostLoad().start()
    _advance(fake_clocks, host=4.0, own=2.0, wall=2.0)  # and another process kept one CPU busy
    assert load.contention(threads=2) == pytest.approx(1.0)
    # a CPU this process never asked for absorbs one CPU of other work
    assert load.contention(threads=1) == 0.0 and load.contention(threads=0) == 0.0
    load = HostLoad().start()
    _advance(fake_clocks, host=0.01, own=0.0, wall=0.1)  # shorter than the kernel's ticks can resolve
    assert load.contention(threads=2) is None


def test_a_cpu_this_process_may_not_run_on_is_not_contention(fake_clocks, monkeypatch):
    monkeypatch.setattr(benchmark, "usable_cpus", lambda: 1)  # pinned to one of the host's two CPUs
    load = HostLoad().start()
    _advance(fake_clocks, host=4.0, own=2.0, wall=2.0)  # another process kept the other CPU busy
    assert load.contention(threads=2) == 0.0  # 2 threads on 1 CPU never use the other one
    load = HostLoad().start()
    _advance(fake_clocks, host=6.0, own=2.0, wall=2.0)  # two other CPUs' worth: one of them was ours
    assert load.contention(threads=2) == pytest.approx(1.0)


def test_more_threads_than_usable_cpus_is_timed_with_a_warning(two_files, monkeypatch):
    fake, calls = _fake_worker({"a": [0.0], "b": [0.0]})
    monkeypatch.setattr(benchmark, "_time_in_subprocess", fake)
    monkeypatch.setattr(benchmark, "usable_cpus", lambda: 1)
    with pytest.warns(UserWarning, match=r"threads=2, but this process may run on 1 CPU\(s\).*threads<=1"):
        stats = round_robin(two_files, [1], threads=2, rounds=1, calls=1)
    assert calls == {"a": 1, "b": 1} and stats["a"]["median_ms"] == 10.0  # still measured
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as many threads as CPUs: nothing to say
        round_robin(two_files, [1], threads=1, rounds=1, calls=1)


def test_busy_seconds_counts_steal_but_not_idle():
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    line = "cpu  100 20 30 5000 40 5 5 200 0 0"
    assert busy_seconds(line, 100) == pytest.approx((100 + 20 + 30 + 5 + 5 + 200) / 100)
    with pytest.raises(ValueError, match="not a /proc/stat cpu line"):
        busy_seconds("intr 1 2 3", 100)


def _fake_worker(contentions: dict[str, list[float | None]]):
    calls: dict[str, int] = {}

    def fake(candidate, shape, threads, warmup, n):
        i = calls.get(candidate.label, 0)
        calls[candidate.label] = i + 1
        c = contentions[candidate.label][min(i, len(contentions[candidate.label]) - 1)]
        return {"times_ms": [10.0 * (i + 1)] * n, "peak_rss_mb": 1.0, "load_and_inference_mb": 0.5, "contention": c}

    return fake, calls


@pytest.fixture()
def two_files(tmp_path):
    paths = []
    for name in ("a", "b"):
        torch.save(torch.nn.Identity(), tmp_path / f"{name}.pt")
        paths.append(Candidate(name, str(tmp_path / f"{name}.pt")))
    return paths


def test_a_measurement_on_a_busy_host_is_retaken(two_files, monkeypatch):
    fake, calls = _fake_worker({"a": [0.9, 0.05], "b": [0.0]})
    monkeypatch.setattr(benchmark, "_time_in_subprocess", fake)
    stats = round_robin(two_files, [1], rounds=1, calls=2, max_contention=0.2)
    assert calls == {"a": 2, "b": 1}
    assert stats["a"]["retaken"] == 1 and stats["a"]["contention_max"] == 0.05
    assert stats["a"]["median_ms"] == 20.0  # the second measurement's times, the first thrown away
    assert stats["b"]["retaken"] == 0 and stats["b"]["median_ms"] == 10.0


def test_a_host_busy_through_every_retry_is_kept_with_a_warning(two_files, monkeypatch):
    fake, calls = _fake_worker({"a": [0.9], "b": [None]})  # b: contention unknown (not Linux)
    monkeypatch.setattr(benchmark, "_time_in_subprocess", fake)
    with pytest.warns(UserWarning, match=r"a: timed while other work kept 0.90 CPUs busy"):
        stats = round_robin(two_files, [1], rounds=2, calls=1, max_contention=0.2, retries=1)
    assert calls == {"a": 4, "b": 2}
    assert stats["a"]["retaken"] == 2 and stats["a"]["contention_max"] == 0.9
    assert stats["b"]["retaken"] == 0 and stats["b"]["contention_max"] is None


def test_max_contention_none_keeps_every_measurement(two_files, monkeypatch):
    fake, calls = _fake_worker({"a": [3.0], "b": [3.0]})
    monkeypatch.setattr(benchmark, "_time_in_subprocess", fake)
    stats = round_robin(two_files, [1], rounds=1, calls=1, max_contention=None)
    assert calls == {"a": 1, "b": 1} and stats["a"]["retaken"] == 0 and stats["a"]["contention_max"] == 3.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_contention": -0.1}, "max_contention=-0.1"),
        ({"max_contention": float("nan")}, "max_contention=nan"),
        ({"retries": -1}, "retries=-1"),
    ],
)
def test_bad_guard_settings_are_refused(two_files, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        round_robin(two_files, [1], **kwargs)


class Sleepy(torch.nn.Module):
    """30 ms a call."""

    def forward(self, x):
        time.sleep(0.03)
        return x


class PidRecorder(torch.nn.Module):
    """Appends the id of the process that runs it to ``path`` on every call."""

    def __init__(self, path):
        super().__init__()
        self.path = str(path)

    def forward(self, x):
        with open(self.path, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return x


@linux
def test_the_worker_reports_its_contention(tmp_path):
    """Even microsecond calls get a load window the kernel's ticks can resolve: the worker pads it with
    untimed calls."""
    torch.save(Sleepy(), tmp_path / "sleepy.pt")
    torch.save(torch.nn.Identity(), tmp_path / "instant.pt")
    stats = round_robin(
        [Candidate("sleepy", str(tmp_path / "sleepy.pt")), Candidate("instant", str(tmp_path / "instant.pt"))],
        [1, 4],
        threads=1,
        rounds=1,
        warmup=1,
        calls=8,
        max_contention=None,
    )
    for label in ("sleepy", "instant"):
        assert isinstance(stats[label]["contention_max"], float) and stats[label]["calls"] == 8
    assert stats["sleepy"]["min_ms"] >= 30 > stats["instant"]["median_ms"]


@pytest.mark.parametrize("fresh", [pytest.param(True, marks=pytest.mark.slow), False])  # fast tier <= 5 min
def test_kept_workers_load_each_file_once_and_never_share_a_process(tmp_path, fresh):
    """fresh_processes=False: one process per candidate for all rounds (one start-up and load each);
    True: a new process per round. Never two candidates in one process."""
    files = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    candidates = []
    for name, log in files.items():
        torch.save(PidRecorder(log), tmp_path / f"{name}.pt")
        candidates.append(Candidate(name, str(tmp_path / f"{name}.pt")))
    stats = round_robin(
        candidates, [1, 4], threads=1, rounds=3, warmup=1, calls=2, max_contention=None, fresh_processes=fresh
    )
    pids = {name: set(log.read_text().split()) for name, log in files.items()}
    assert {name: len(p) for name, p in pids.items()} == {"a": 3 if fresh else 1, "b": 3 if fresh else 1}
    assert not pids["a"] & pids["b"] and str(os.getpid()) not in pids["a"] | pids["b"]
    assert stats["a"]["calls"] == stats["b"]["calls"] == 6


def test_a_worker_that_fails_to_load_names_its_file(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=r"timing broken failed: .*"):
        round_robin([Candidate("broken", str(tmp_path / "broken.pt"))], [1, 4], rounds=1, fresh_processes=False)


@linux
def test_a_window_shorter_than_the_kernel_can_count_in_is_unknown():
    load = HostLoad().start()
    assert load.contention(threads=1) is None  # default min_window_s=0.2
    assert load.contention(threads=1, min_window_s=0.0) is not None
