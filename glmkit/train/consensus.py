"""Deciding together: whether any process failed, so that every process stops at the same point.

A multi-process run must never leave one process in a collective that its peers will not join (a hang
until the NCCL timeout). So a failure that one process sees (a full disk, bad data, a held lock, a
signal) is turned into a flag that every process reduces at an agreed point; all of them then raise, or
all of them go on. This is the one place that reduction is written.
"""

from __future__ import annotations

import torch


def any_process(accelerator, true_here: bool) -> bool:
    """True on every process if `true_here` is true on any of them (also a barrier)."""
    flag = torch.tensor([1 if true_here else 0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item())


def all_or_none(accelerator, work, *args, errors: tuple[type[BaseException], ...], elsewhere: BaseException):
    """work(*args) on every process; if it raised one of `errors` on any process, every process raises.

    A process that did not fail itself raises `elsewhere`, whose message points at the failing process's own line
    (which that process prints)."""
    result, error = None, None
    try:
        result = work(*args)
    except errors as exc:
        error = exc
    if any_process(accelerator, error is not None):
        raise error or elsewhere
    return result
