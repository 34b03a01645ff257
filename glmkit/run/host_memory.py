"""How much memory this machine can still give: the one reading of it, for every check made before allocating.

MemAvailable (Linux's estimate of what can be allocated without swapping) is what a CPU run's memory plan
(glmkit/plan/fit.py) and the data preparation's row layout (glmkit/data/prepare.py) are compared with.
"""

from __future__ import annotations


def available_bytes() -> int | None:
    """MemAvailable in bytes; None where /proc/meminfo does not say (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
