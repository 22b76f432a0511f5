"""The process's numeric runtime, set once per process and recorded with every run: torch's thread count,
deterministic algorithms, and the versions and hardware the numbers came from.

Bit-exact results need the same machine type, library versions and thread count: float sums reduce in a
different order with another thread count or another CPU's vector width (README: reproducibility).
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import torch

PACKAGES = ("torch", "torchvision", "numpy", "opencv-python-headless", "ray", "mlflow", "labelshift-seg")


def apply_runtime(threads: int | None, deterministic: bool) -> None:
    """Use ``threads`` intra-op threads (None: leave torch's default) and, when ``deterministic``, torch's
    deterministic algorithms (``warn_only``: an op without one warns instead of failing; on CUDA the cuBLAS
    workspace is fixed as deterministic GEMMs need)."""
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_environment() -> dict[str, Any]:
    """Versions, hardware and numeric settings of this process (JSON-able), for manifests and MLflow."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(), "platform": platform.platform(), "packages": versions,
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cuda": torch.version.cuda,
    }
