"""Shared helpers for the CPU benchmarks: machine description, medians, JSON output, tables.

Every benchmark script imports this module first (it puts the repository root on sys.path),
writes one JSON file (`--out`, default `bench/results/<name>.json`) and prints a Markdown
table that can be pasted into docs/BENCHMARKS.md as it is.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny.yaml")
REAL_CONFIG = os.path.join(REPO_ROOT, "training_config.yaml")
SCRATCH = os.path.join(REPO_ROOT, "scratch")  # git-ignored



# ---------------------------------------------------------------------------
# Machine and environment
# ---------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the numbers were measured on (absolute times mean nothing without it)."""
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import psutil

        info["ram_total_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported as missing
            versions[name] = None
    info["versions"] = versions
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def start_tiny_bench(threads: int | None) -> dict:
    """Quiet logs, set torch threads, make sure the tiny model and corpus exist; the machine's description."""
    quiet()
    set_threads(threads)
    ensure_tiny_assets()
    return machine_info()


def quiet() -> None:
    """Silence the warnings the benchmarks do not act on (bitsandbytes' optional CPU kernels)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def quartiles(values) -> tuple[float, float]:
    """(25th, 75th) percentile; with fewer than 2 values both are the value itself."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan"), float("nan")
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summary(values) -> dict:
    lo, hi = quartiles(values)
    return {"median": median(values), "p25": lo, "p75": hi, "n": len([v for v in values if v is not None])}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def default_out(name: str) -> str:
    return os.path.join(RESULTS_DIR, f"{name}.json")


def write_json(path: str, payload: dict) -> None:
    """Atomic write (a *.tmp beside it, git-ignored, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=_jsonable)
        fh.write("\n")
    os.replace(tmp, path)
    print(f"\nwrote {os.path.relpath(path, os.getcwd())}")


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, set):
        return sorted(value)
    return str(value)


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table; `align` is one char per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def fmt(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w for w, a in zip(widths, align)) + " |"
    return "\n".join([fmt(headers), sep, *(fmt(r) for r in cells)])


def machine_line(info: dict) -> str:
    return (f"machine: {info.get('cpu_model')}, {info.get('cpu_count')} CPU cores, "
            f"{info.get('ram_total_gb', '?')} GB RAM, torch {info['versions'].get('torch')} "
            f"({info.get('torch_threads')} threads), load average at start "
            f"{', '.join(f'{x:.1f}' for x in info.get('loadavg_at_start') or [])}")


# ---------------------------------------------------------------------------
# The kit's CPU assets
# ---------------------------------------------------------------------------

def ensure_tiny_assets() -> None:
    """Build the tiny model and the demo corpus where configs/tiny.yaml expects them, if missing."""
    model_dir = os.path.join(REPO_ROOT, "models", "tiny-glm4-moe")
    data_path = os.path.join(REPO_ROOT, "data", "demo.jsonl")
    if not os.path.isfile(os.path.join(data_path)):
        from glmkit.demo.corpus import write_demo_corpus

        print(f"writing the demo corpus to {data_path}")
        write_demo_corpus(data_path)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        from glmkit.demo.tiny import write_tiny_checkpoint

        print(f"writing the tiny model to {model_dir}")
        write_tiny_checkpoint(model_dir)


def tiny_config(overrides=()):
    from glmkit.config.load import load_config

    return load_config(TINY_CONFIG, list(overrides))


def fmt_pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def fmt_ratio(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}x"
