"""The Accelerator a run uses, and the checks a multi-process run needs before it trains."""

from __future__ import annotations

import os
import re
import signal
import time

import torch

from glmkit.config.strategy import strategy
from glmkit.run.parent_death import signal_on_parent_death
from glmkit.train.checkpoint import ResumeError
from glmkit.train.faults import unshared_view


class LaunchMismatch(RuntimeError):
    """The processes were started for another strategy than distributed.accelerate_config names."""


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent (the launcher) dies; False if not asked.

    torch elastic starts every rank in a session of its own, so a SIGKILLed `accelerate launch` would
    leave the ranks training unsupervised (and holding the run's lock). SIGTERM is the preemption signal
    (glmkit/train/preemption.py): once training runs, the ranks save a checkpoint together and exit.
    Only for processes a launcher started: a `python train_qlora.py` from a shell keeps its own life.
    """
    if "LOCAL_RANK" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # set by both launchers
        return False
    return signal_on_parent_death(sig)


def check_launched_strategy(cfg, accelerator) -> None:
    """Refuse a run that Accelerate set up with its own FSDP or DeepSpeed plugin.

    Both strategies the kit offers start as plain multi-process runs: under `ddp` Accelerate wraps the
    model, under `fsdp` the trainer shards it itself (glmkit/train/fsdp.py). Accelerate's plugins would
    replicate (FSDP) or fail to partition (DeepSpeed) the frozen 4-bit weights, so a hand-written launch
    that turns one on is stopped before a weight is read.
    """
    from accelerate.utils import DistributedType

    plugins = {DistributedType.FSDP: "FSDP plugin", DistributedType.DEEPSPEED: "DeepSpeed plugin"}
    if accelerator.distributed_type in plugins:
        raise LaunchMismatch(f"this run was launched with Accelerate's {plugins[accelerator.distributed_type]}, "
                             f"which cannot shard the kit's 4-bit weights; distributed.accelerate_config is "
                             f"{strategy(cfg)}: start it with ./launch_training.sh (a plain multi-process launch; "
                             f"with fsdp the trainer shards the model itself)")


def make_accelerator(cfg):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import GradientAccumulationPlugin

    if cfg.performance.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # cpu=True on a machine without CUDA: otherwise `accelerate launch --num_processes 2`
    # silently runs each process alone instead of over gloo.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        # Groups of exactly grad_accum micro-batches, so the sync counter never drifts.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.optimization.grad_accum_steps,
                                                                sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True,
                                                  data_seed=cfg.training.seed),
    )


def check_shared_output_dir(accelerator, output_dir: str) -> None:
    """Every process must see the same paths.output_dir, or checkpoints can't be resumed.

    Each process writes its own RNG state into the checkpoint, and only the main process
    finalises the folder: on node-local disks the other nodes' parts would be lost. The main
    process writes a token; every process reads it back through its own view of the folder.
    """
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    marker = os.path.join(output_dir, ".shared-storage-check")
    token = [f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"]
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(token[0])
    broadcast_object_list(token)
    seen = None
    view = unshared_view(marker, accelerator.process_index)
    if os.path.isfile(view):
        with open(view, encoding="utf-8") as fh:
            seen = fh.read()
    blind = int(accelerator.reduce(torch.tensor([int(seen != token[0])], device=accelerator.device), "sum").item())
    if accelerator.is_main_process:
        os.remove(marker)
    if blind:
        raise ResumeError(f"paths.output_dir {output_dir} is not the same folder for every process: {blind} "
                          f"of {accelerator.num_processes} cannot see what the main process writes there. Put it on "
                          f"storage all nodes share (NFS, Lustre, ...); checkpoints hold every process's state")


# What torch's collectives raise when the process at the other end is gone (gloo: the socket; NCCL: the abort).
_PEER_GONE = re.compile(r"Connection (reset|closed) by peer|Broken pipe|NCCL communicator was aborted|"
                        r"remote process exited|ncclRemoteError")


def lost_peer(exc: BaseException, accelerator, output_dir: str) -> str | None:
    """One line for a surviving process whose collective lost another process of the run (SIGKILLed, OOM-killed,
    its node gone), instead of the backend's traceback; None for any other error. The killed process writes
    nothing itself: the launcher (glmkit/launch/accelerate.py) names it and records it in the error log."""
    found = _PEER_GONE.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if accelerator.num_processes == 1 or found is None:
        return None
    from glmkit.run.checkpoint_names import latest_checkpoint

    latest = latest_checkpoint(output_dir)
    return (f"rank {accelerator.process_index}: another process of this run is gone (a collective lost its "
            f"connection: {found.group(0)}); the launcher's line names it; "
            + (f"the latest complete checkpoint, {latest}, is intact; " if latest else "")
            + "relaunch to resume")
