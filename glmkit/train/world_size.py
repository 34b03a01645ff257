"""Resuming on another number of processes: the same global batch, the same data, the step count unchanged.

A step's rows are micro_batch_per_gpu x grad_accum_steps x processes. A checkpoint taken at one
world size continues at another when grad accumulation can be recomputed to keep that number:
4 processes x accum 2 become 8 x 1 or 2 x 4. Otherwise the resume is refused in one line naming
the process counts that work. With distributed.sequence_parallel P the rows are dealt among groups of
P processes instead (glmkit/train/sequence_parallel.py), so a change of P is the same kind of move:
2 processes at P=1 and accum 2 become 2 at P=2 and accum 4.

The global data order does not depend on the world size: Accelerate's seedable sampler shuffles
the whole split once per epoch, cuts it into micro-batches, and deals them out round robin (process
p gets micro-batches p, p+W, p+2W, ...). A step at world W and accum A takes global micro-batches
[s*W*A, (s+1)*W*A), the same set of rows at any W when W*A is kept, and the loss is a token-weighted
sum over all of them. What a checkpoint records of the position is how many micro-batches each
process has drawn this epoch (steps x accum), so the resumed loader skips steps x the new accum.

Not carried across a world-size change: per-process random streams for ranks the checkpoint did not
have (they start from the seed; only LoRA dropout draws from them, and expert LoRA runs at dropout 0).
The optimizer state is resharded by torch.distributed.checkpoint (fsdp) or is a replica (ddp).
"""

from __future__ import annotations

import os

# The keys a world-size change is allowed to move together (compared as the checkpoint's, once checked here).
MOVED_KEYS = ("world_size", "optimization.grad_accum_steps", "distributed.sequence_parallel")
DATALOADER_STATE = "dl_state_dict.bin"  # Accelerate's name for the data loader's position


class WorldSizeChange(ValueError):
    """The checkpoint's global batch can't be kept at this world size (the message says which sizes can)."""


def worlds_that_keep(rows: int, micro: int, limit: int = 1024) -> list[int]:
    """Process counts W for which rows = micro x accum x W with a whole accum >= 1."""
    if rows % micro:
        return []
    per_micro = rows // micro
    return [w for w in range(1, min(per_micro, limit) + 1) if per_micro % w == 0]


def _processes(world: int, sequence_parallel: int) -> str:
    return (f"{world} process{'es' if world > 1 else ''}"
            + (f" with sequence_parallel {sequence_parallel}" if sequence_parallel > 1 else ""))


def keep_global_batch(saved: dict, cfg, world: int) -> tuple[int, str] | None:
    """If the world size or distributed.sequence_parallel changed since the checkpoint: the grad_accum_steps
    that gives a step the checkpoint's rows here, and a line saying so; None when neither changed. `saved` is
    the checkpoint's flat config. The caller applies it: this reads cfg, never changes it.

    Rows are dealt among the sequence-parallel groups (world / sequence_parallel of them; glmkit/train/
    sequence_parallel.py), which take the place of processes in the rule above."""
    saved_world = saved.get("world_size")
    saved_sp, sp = saved.get("distributed.sequence_parallel") or 1, cfg.distributed.sequence_parallel
    if saved_world is None or (saved_world == world and saved_sp == sp):
        return None
    saved_micro, saved_accum = saved["optimization.micro_batch_per_gpu"], saved["optimization.grad_accum_steps"]
    saved_groups, groups = saved_world // saved_sp, world // sp
    rows = saved_micro * saved_accum * saved_groups
    micro = cfg.optimization.micro_batch_per_gpu
    dealt = "processes" if saved_sp == 1 else f"groups of {saved_sp} processes"
    if rows % (micro * groups):
        worlds = [w * sp for w in worlds_that_keep(rows, micro)]
        works = (f"resume on {', '.join(map(str, worlds[:12]))} processes" if worlds else
                 "change optimization.micro_batch_per_gpu to a divisor of it")
        raise WorldSizeChange(
            f"cannot resume on {_processes(world, sp)}: the checkpoint trained {rows} rows per optimizer step "
            f"({saved_micro} micro x {saved_accum} accum x {saved_groups} {dealt}), and {groups} x "
            f"micro_batch_per_gpu {micro} does not divide {rows}; {works}, or start a new run")
    accum = rows // (micro * groups)
    return accum, (f"resuming on {_processes(world, sp)} (the checkpoint ran on {_processes(saved_world, saved_sp)}): "
                   f"optimization.grad_accum_steps {saved_accum} -> {accum} keeps {rows} rows per optimizer step")


def restore_data_position(loader, checkpoint: str, saved_accum: int, accum: int) -> None:
    """After Accelerate loaded the position drawn at the checkpoint's world size: the same steps at this one.

    Each process had drawn steps x saved_accum micro-batches of the epoch; here each must have drawn
    steps x accum (the round-robin deal above makes those the same global micro-batches).
    """
    import torch

    state = torch.load(os.path.join(checkpoint, DATALOADER_STATE), weights_only=False)
    for key in ("_num_yielded", "_sampler_iter_yielded"):
        if state.get(key) is not None:
            steps, rest = divmod(state[key], saved_accum)
            state[key] = steps * accum + rest
    loader.load_state_dict(state)
