"""DDP start-up without the frozen base model.

`DistributedDataParallel.__init__` broadcasts every parameter and buffer of the module from
rank 0 (torch 2.13: `_sync_module_states`), and by default broadcasts the buffers again at
every forward. For a QLoRA replica that is ~57 GB of frozen 4-bit weights per GPU, which
every rank has just loaded from the same files itself: minutes of start-up for nothing.
DDP skips the names listed in the module's `_ddp_params_and_buffers_to_ignore`, both in
that broadcast and when it builds the reducer's gradient buckets (frozen parameters never
get buckets anyway). Listing every frozen parameter and every buffer (rotary tables,
the router's fixed correction bias) leaves DDP the trainable LoRA weights only: broadcast
once at start-up (cheap, and a guard against ranks initialising them differently) and
all-reduced in backward.

GLMKIT_DDP_SYNC_FROZEN=1 restores the stock behaviour, for A/B comparisons.
"""

from __future__ import annotations

import os

import torch


def exclude_frozen_from_sync(model) -> None:
    """Before accelerator.prepare: DDP ignores every frozen parameter and every buffer of `model`."""
    if os.environ.get("GLMKIT_DDP_SYNC_FROZEN") == "1":
        return
    ignored = [name for name, param in model.named_parameters() if not param.requires_grad]
    ignored += [name for name, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sync_report(prepared) -> dict | None:
    """What DDP itself will broadcast and all-reduce, read off the prepared model (None: not DDP).

    Start-up broadcasts the parameters not in DDP's ignore set, plus its buffers when it
    syncs buffers; every forward broadcasts `modules_buffers`; backward all-reduces the
    reducer's parameters.
    """
    if not isinstance(prepared, torch.nn.parallel.DistributedDataParallel):
        return None
    ignore = prepared.parameters_to_ignore
    params = dict(prepared.module.named_parameters())
    broadcast = [p for name, p in params.items() if name not in ignore]
    ignored = [p for name, p in params.items() if name in ignore]
    buffers = list(prepared.modules_buffers)
    reduced = [p for p in broadcast if p.requires_grad]
    return {
        "broadcast_params": len(broadcast), "broadcast_bytes": _bytes(broadcast),
        "broadcast_buffers": len(buffers), "broadcast_buffer_bytes": _bytes(buffers),
        "ignored_params": len(ignored), "ignored_bytes": _bytes(ignored),
        "all_reduced_params": len(reduced), "all_reduced_bytes": _bytes(reduced),
    }
