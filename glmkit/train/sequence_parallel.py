"""Sequence parallelism: the P processes of a group share each row, each computing a contiguous slice of it.

A row's activations grow with its length: at 128k tokens GLM-4.5-Air's are about 195 GB, more than any
GPU, and neither DDP nor FSDP splits a row. With `distributed.sequence_parallel: P` every process keeps
length/P tokens of each row through the whole model; attention, the one place that needs whole rows,
trades heads for tokens with an all-to-all before and after (glmkit/model/sequence_parallel.py).

- Groups: processes [gP, (g+1)P) form group g, consecutive ranks so that a group sits on one node. The
  group's index and the number of groups (W/P) replace the process index and count wherever rows are
  dealt: the training loader (`deal_among_groups`) and every eval, so a group's processes get the same rows.
- A batch: the collator builds whole rows; `local_batch` keeps this process's slice of each. The targets
  are shifted over the whole row first (the token a slice's last position predicts is the next slice's
  first), so the slices' losses add up to the row's. The segment boundaries stay the whole rows'.
- Loss, token counts, router statistics, evals: each process sums over its own slice, and the kit already
  sums those over every process: each token of each row counted once, exactly.
- Gradients: a process's LoRA gradient is a partial one, from its slice's loss plus what reaches its
  slice back through the all-to-all. The step scales each process's loss by W / (the step's target tokens
  over every process), and DDP, like FSDP's reduce-scatter, averages over all W processes: the result is
  the sum over every process divided by the tokens, so summed within a group and token-weighted across
  groups, the same gradient as one process computing all the rows (the tests hold it to 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmkit.model.sequence_parallel import sizes_that_split
from glmkit.train.loss import shifted_targets


class SequenceParallelError(ValueError):
    """distributed.sequence_parallel does not fit this launch (the message says what does)."""


@dataclass(frozen=True)
class SequenceParallel:
    """Where this process stands: which slice of the rows it computes, and which rows."""
    size: int            # P: processes sharing each row
    rank: int            # this process's slice: tokens [rank, rank + 1) x length / P of every row
    group: object        # the torch ProcessGroup of those P processes (None when P is 1)
    data_rank: int       # which rows: this group's index
    data_groups: int     # groups in the run (W / P): rows are dealt among these

    def local_batch(self, batch: dict) -> dict:
        """This process's slice of every row of a collated batch (the batch itself when P is 1).

        input_ids, position_ids and token_mask are cut; `targets` (the next token of each position, over
        the whole row) replace `labels`; cu_seqlens / max_seqlen stay the whole rows'; `sequence_group`
        tells the attention to exchange (glmkit/model/attention.py).
        """
        if self.size == 1:
            return batch
        length = batch["input_ids"].shape[1]
        if length % self.size:
            raise ValueError(f"rows of {length} tokens cannot be cut into {self.size} equal slices (the collator "
                             f"pads to a multiple of distributed.sequence_parallel)")
        if "attention_mask" in batch:
            raise ValueError("a sequence-parallel batch carries segment boundaries, not a mask")
        width = length // self.size
        cut = slice(self.rank * width, (self.rank + 1) * width)
        local = {key: batch[key][:, cut] for key in ("input_ids", "position_ids", "token_mask") if key in batch}
        local["targets"] = shifted_targets(batch["labels"])[:, cut]
        local["cu_seqlens"], local["max_seqlen"] = batch["cu_seqlens"], batch["max_seqlen"]
        local["sequence_group"] = self.group
        return local


def single_process_layout(accelerator) -> SequenceParallel:
    """No sequence parallelism: every process its own rows."""
    return SequenceParallel(1, 0, None, accelerator.process_index, accelerator.num_processes)


def setup_sequence_parallel(cfg, accelerator) -> SequenceParallel:
    """This process's place, after checking P divides the launched processes (the KV heads: check_model_dir).

    Every process creates every group, in the same order, as torch.distributed requires."""
    size, world = cfg.distributed.sequence_parallel, accelerator.num_processes
    if size == 1:
        return single_process_layout(accelerator)
    if world % size:
        works = ", ".join(map(str, sizes_that_split(processes=world)))
        raise SequenceParallelError(
            f"distributed.sequence_parallel: {size} does not divide the {world} processes of this launch: each "
            f"group of {size} processes shares rows; use {works}, or launch a multiple of {size} processes")
    rank = accelerator.process_index
    mine = None
    for first in range(0, world, size):
        group = torch.distributed.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return SequenceParallel(size, rank % size, mine, rank // size, world // size)


def deal_among_groups(accelerator, loader, layout: SequenceParallel):
    """The training loader dealt among the groups, as accelerator.prepare deals a loader among processes (the
    same seedable shuffle, stateful position and device placement); P = 1: the loader as it is, for
    accelerator.prepare to deal. Either way accelerator.prepare registers it, so checkpoints save its position."""
    if layout.size == 1:
        return loader
    from accelerate.data_loader import prepare_data_loader

    dealt = prepare_data_loader(
        loader, accelerator.device, num_processes=layout.data_groups, process_index=layout.data_rank,
        split_batches=accelerator.split_batches, put_on_device=accelerator.device_placement,
        rng_types=accelerator.rng_types.copy(), dispatch_batches=accelerator.dispatch_batches,
        even_batches=accelerator.even_batches, use_seedable_sampler=accelerator.use_seedable_sampler,
        data_seed=accelerator.dataloader_config.data_seed, non_blocking=accelerator.non_blocking,
        use_stateful_dataloader=accelerator.use_stateful_dataloader)
    dealt._is_accelerate_prepared = True  # accelerator.prepare then registers it without dealing it again
    return dealt
