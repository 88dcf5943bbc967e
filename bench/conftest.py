"""Adds what bench/report.py prints in its header to the benchmark JSON: CPU, versions, the exact command."""
import os
import platform
import shlex

import numba
import numpy
import pytest_benchmark


def cpu_model():
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    import fastopt
    import torch

    try:
        threading_layer = numba.threading_layer()
    except ValueError:  # no parallel kernel ran
        threading_layer = "not started"
    machine_info["fastopt"] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "numba_threading_layer": threading_layer,
        "versions": {"python": platform.python_version(), "numpy": numpy.__version__, "numba": numba.__version__,
                     "torch": torch.__version__, "fastopt": fastopt.__version__,
                     "pytest-benchmark": pytest_benchmark.__version__},
        "command": shlex.join(["python", "-m", "pytest", *config.invocation_params.args]),
    }
