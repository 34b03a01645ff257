"""GPU cards through NVML; an empty list with a reason where there is none."""

from __future__ import annotations

import threading
import time

CACHE_SECONDS = 1.0  # NVML queries cost a few ms per GPU; the page polls often


def _query(pynvml, index: int) -> dict:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    info = {"index": index, "name": name.decode() if isinstance(name, bytes) else name}
    readers = {
        "utilization": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "memory_used": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used,
        "memory_total": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total,
        "temperature": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        "power_watts": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        "power_limit_watts": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
    }
    for key, read in readers.items():
        try:
            info[key] = read()
        except Exception:  # noqa: BLE001 - one unsupported sensor must not hide the card
            info[key] = None
    return info


class GpuProbe:
    def __init__(self):
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None
        self._nvml = None
        self._init_error: str | None = None

    def read(self) -> dict:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > CACHE_SECONDS:
                self._cached = (now, self._read())
            return self._cached[1]

    def _ensure_nvml(self):
        if self._nvml is None and self._init_error is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except ImportError:
                self._init_error = "GPU status needs nvidia-ml-py (pip install -r requirements.txt)"
            except Exception as exc:  # noqa: BLE001 - NVMLError subclasses vary by driver
                self._init_error = no_gpu_reason(exc)
        return self._nvml

    def _read(self) -> dict:
        pynvml = self._ensure_nvml()
        if pynvml is None:
            return {"gpus": [], "reason": self._init_error}
        try:
            count = pynvml.nvmlDeviceGetCount()
            gpus = [_query(pynvml, i) for i in range(count)]
        except Exception as exc:  # noqa: BLE001
            return {"gpus": [], "reason": f"NVML query failed: {exc}"}
        return {"gpus": gpus, "reason": None if gpus else "No GPU on this machine (the NVIDIA driver reports none)."}


def no_gpu_reason(exc: Exception) -> str:
    """NVML's start-up error in words: a machine without an NVIDIA driver is a machine without a GPU."""
    text = str(exc)
    if "Library Not Found" in text or type(exc).__name__.endswith("LibraryNotFound"):
        return "No GPU on this machine (no NVIDIA driver is installed)."
    if "Driver Not Loaded" in text or type(exc).__name__.endswith("DriverNotLoaded"):
        return "No GPU on this machine (the NVIDIA driver is not loaded)."
    return f"GPU status unavailable: NVML says {text}"
