"""GPU detection and the devices a task sees: the node's GPU ids map onto the visible devices."""

from __future__ import annotations

import os
import stat

import pytest

import rayx
from rayx import cluster


@rayx.remote
def seen():
    return rayx.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_tasks_get_the_devices_cuda_visible_devices_names(fresh_cluster, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    fresh_cluster(num_cpus=2)
    assert rayx.cluster_resources()["GPU"] == 2
    ids, visible = rayx.get(seen.options(num_gpus=2).remote())
    assert ids == [5, 7] and visible == "5,7"
    one = rayx.get([seen.options(num_gpus=1).remote() for _ in range(4)])
    assert {v for _, v in one} <= {"5", "7"} and all(len(i) == 1 for i, _ in one)
    assert rayx.get(seen.remote()) == ([], "")  # no GPU asked: none visible


def test_virtual_gpus_beyond_the_visible_ones_are_plain_ids(fresh_cluster, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    fresh_cluster(num_cpus=1, num_gpus=4)
    ids, visible = rayx.get(seen.options(num_gpus=4).remote())
    assert ids == [0, 1, 2, 3] and visible == "0,1,2,3"


@pytest.mark.parametrize("value, expected", [
    ("", []), ("-1", []), ("NoDevFiles", []), ("0,-1,2", ["0"]), ("1, 2", ["1", "2"]),
    ("GPU-8f2e,GPU-11aa", ["GPU-8f2e", "GPU-11aa"]),
])
def test_cuda_visible_devices_is_read_as_cuda_reads_it(monkeypatch, value, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert cluster.visible_gpu_devices() == expected
    assert cluster.detect_gpus() == len(expected)


def test_nvidia_smi_counts_the_gpus_when_nothing_is_set(monkeypatch, tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\n"
                   "echo 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert cluster.visible_gpu_devices() == ["0", "1"]
    assert rayx.get_gpu_ids() == [0, 1]  # the driver sees what it may use
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cluster.detect_gpus() == 0
