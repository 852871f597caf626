"""The host's measured GEMM throughput, the reference of every efficiency share: fp32, bf16 and the
fastest int8 kernel among those installed (OpenVINO's AMX int8 FullyConnected included)."""

import pytest

from pqv_lightning.apps.sweep import _peak_for
from pqv_lightning.export import TARGETS
from pqv_lightning.export.host import gemm_throughput, openvino_int8_gemm

needs_ov = pytest.mark.skipif(
    TARGETS["openvino"].missing() is not None, reason="extra not installed: pip install 'pqv-lightning[openvino]'"
)


def test_gemm_throughput_measures_bf16_and_takes_the_fastest_int8_kernel():
    g = gemm_throughput(threads=1, size=128, calls=2)
    assert g["fp32_gops"] > 0 and g["bf16_gops"] > 0 and g["bf16_source"] == "torch.mm"
    sources = {k[len("int8_gops[") : -1]: v for k, v in g.items() if k.startswith("int8_gops[")}
    assert "torch._int_mm" in sources and all(v > 0 for v in sources.values())
    assert g["int8_gops"] == max(sources.values()) and g["int8_source"] == max(sources, key=sources.get)
    if TARGETS["openvino"].missing() is None:
        assert "openvino FullyConnected" in sources


@needs_ov
def test_the_openvino_gemm_runs_as_an_int8_fully_connected():
    compiled, feed = openvino_int8_gemm(64, threads=1)
    layers = {
        op.get_rt_info()["layerType"].astype(str): op.get_rt_info()["runtimePrecision"].astype(str)
        for op in compiled.get_runtime_model().get_ops()
    }
    assert layers.get("FullyConnected") in ("u8", "i8"), layers  # not a float MatMul
    assert compiled.create_infer_request().infer(feed)[0].shape == (64, 64)


@pytest.mark.parametrize(
    "precision, expected",
    [("int8-static", 3000.0), ("int8-dynamic", 3000.0), ("fp32", 300.0), ("fp16", 900.0), ("bf16", 900.0)],
)
def test_each_precision_is_measured_against_its_own_peak(precision, expected):
    peak = {"fp32_gops": 300.0, "bf16_gops": 900.0, "int8_gops": 3000.0}
    assert _peak_for(peak, precision) == expected


def test_a_gemm_cell_without_bf16_measures_fp16_against_fp32():
    assert _peak_for({"fp32_gops": 300.0, "int8_gops": 3000.0}, "fp16") == 300.0
    assert _peak_for({"fp32_gops": 300.0, "bf16_gops": 100.0, "int8_gops": 3000.0}, "fp16") == 300.0


def test_the_host_description_tells_alike_named_cpus_apart(monkeypatch, tmp_path):
    from pqv_lightning import hostcpu
    from pqv_lightning.export import host

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
        "model name\t: Intel(R) Xeon(R) Processor\nstepping\t: 8\ncache size\t: 107520 KB\n"
        "siblings\t: 2\ncpu cores\t: 1\n"
        "flags\t\t: avx2 avx512f amx_int8\n\nprocessor\t: 1\nmodel\t\t: 999\n"
    )
    monkeypatch.setattr(host, "cpu_info", lambda: hostcpu.cpu_info(cpuinfo))
    described = host.host_description()
    assert described["cpu"] == "Intel(R) Xeon(R) Processor" and described["isa"] == ["avx2", "avx512f", "amx_int8"]
    assert described["cpuid"] == "family 6 model 143 stepping 8" and described["cache_size"] == "107520 KB"
    assert host.host_label(described) == "Intel(R) Xeon(R) Processor (family 6 model 143 stepping 8, 107520 KB)"
    assert host.host_label({"cpu": "Apple M2"}) == "Apple M2"  # nothing else known: the name alone
    # two logical CPUs that are the hyperthreads of one core: said wherever the host is printed
    assert described["threads_per_core"] == 2
    assert host.cpu_count_text({**described, "logical_cpus": 2}) == "2 logical CPUs, 2 per core"
    assert host.cpu_count_text({"logical_cpus": 4}) == "4 logical CPUs"  # an older result: unknown
    # a process pinned to fewer CPUs than the machine has (taskset, a container's cpuset) says so
    monkeypatch.setattr(host, "usable_cpus", lambda: 1)
    pinned = {**host.host_description(), "logical_cpus": 2}
    assert pinned["usable_cpus"] == 1
    assert host.cpu_count_text(pinned) == "2 logical CPUs (1 usable by this process), 2 per core"
    assert host.cpu_count_text({**pinned, "usable_cpus": 2}) == "2 logical CPUs, 2 per core"


def test_usable_cpus_is_the_affinity_mask_not_the_machine(monkeypatch):
    from pqv_lightning import hostcpu

    monkeypatch.setattr(hostcpu.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(hostcpu.os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    assert hostcpu.usable_cpus() == 2
    monkeypatch.delattr(hostcpu.os, "sched_getaffinity")  # macOS, Windows: no mask to read
    assert hostcpu.usable_cpus() == 64


@pytest.mark.parametrize(
    "info, expected",
    [
        ({"siblings": "2", "cpu cores": "2"}, 1),
        ({"siblings": "4", "cpu cores": "2"}, 2),
        ({"siblings": "2"}, None),  # Arm and some VMs print neither
        ({"siblings": "2", "cpu cores": "0"}, None),
        ({"siblings": "1", "cpu cores": "2"}, None),  # inconsistent: not guessed
        ({"siblings": "two", "cpu cores": "1"}, None),
    ],
)
def test_threads_per_core_comes_from_siblings_over_cores(info, expected):
    from pqv_lightning.hostcpu import threads_per_core

    assert threads_per_core(info) == expected
