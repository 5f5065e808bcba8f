"""Shared settings for the pytest-benchmark suites (run them with `python bench/report.py`)."""
from __future__ import annotations

import platform

import pytest
import torch


def machine_name() -> str:
    """The device a number belongs to: GPU name, or CPU model and core count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = f"{cpu} ({cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        name = f"{torch.cuda.get_device_name()} | host {name}"
    return name


@pytest.fixture(scope="session")
def machine() -> str:
    return machine_name()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["sgengine_machine"] = machine_name()


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
