"""One optimizer step: draw the micro-batches, token-weighted forward/backward, clip, update.

`train_step` is the loop's step and the overhead benchmark's, so the benchmark measures what
training runs. The loss is summed over target tokens and divided by the step's target tokens
over every micro-batch and process, so a step's loss is token-weighted (a mean of means would
overweight short batches). Target tokens are the trained ones: every real token but a document's
first for text, the tokens chat data trains on (glmkit/data/chat.py) for chat rows. With `mtp.train` the MTP
layer's loss (glmkit/train/mtp.py) is added, a mean over its own targets the same way, times `mtp.loss_weight`;
the logged `loss` stays the language-modelling loss, so its curve means what it meant without the MTP layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice

import torch

from glmkit.data.rows import IGNORE_INDEX
from glmkit.train.faults import injected_nan, maybe_kill
from glmkit.train.loss import batch_targets, causal_lm_loss_sum
from glmkit.train.mtp import lm_and_mtp_loss_sums, mtp_target_tokens


@dataclass(frozen=True)
class StepResult:
    loss: float            # token-weighted over the step's micro-batches and processes
    grad_norm: float       # before clipping
    lr: float              # the learning rate this step used
    input_tokens: int      # non-pad input tokens, all processes (seen)
    applied: bool          # False: a non-finite loss or grad norm, so the update was skipped
    trained_tokens: int = 0  # target tokens the loss counted, all processes (trained)
    mtp_loss: float | None = None  # the MTP layer's loss, token-weighted like `loss` (None: not trained)


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over the batch's target tokens; lm_head and the loss in chunks of tokens,
    never the full-vocabulary logits (glmkit/train/loss.py)."""
    return causal_lm_loss_sum(model, batch)


def target_tokens(batch: dict) -> int:
    return int((batch_targets(batch) != IGNORE_INDEX).sum())


def count_tokens(group: list[dict], accelerator) -> tuple[torch.Tensor, int]:
    """(target tokens, non-pad input tokens) of a step's micro-batches, summed over processes in one reduce."""
    counts = torch.tensor([[target_tokens(b), int(b["token_mask"].sum())] for b in group], device=accelerator.device)
    totals = accelerator.reduce(counts.sum(dim=0), "sum")
    return totals[0], int(totals[1].item())


def step_groups(loader, grad_accum: int, epoch: int, layout=None):
    """Yield (epoch, [micro-batches]) forever; an epoch's incomplete last group is dropped.

    `layout` (glmkit/train/sequence_parallel.py): each micro-batch is this process's slice of its rows."""
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = iter(loader)
        while len(group := list(islice(batches, grad_accum))) == grad_accum:
            yield epoch, [layout.local_batch(batch) for batch in group] if layout else group
        epoch += 1


def next_group(groups):
    """The next step's micro-batches, drawn without touching the global torch RNG.

    Loading draws random numbers (iterator seeds, Accelerate's RNG sync) at moments that
    differ between a fresh and a resumed run; kept apart, the stream LoRA dropout uses is a
    function of the step alone, and a resumed run matches an uninterrupted one to the bit.
    """
    rng = torch.get_rng_state()
    try:
        return next(groups)
    finally:
        torch.set_rng_state(rng)


def train_step(model, group: list[dict], *, accelerator, optimizer, scheduler, stats, max_grad_norm: float,
               step: int, mtp=None) -> StepResult:
    """Forward/backward over `group`, then one AdamW update unless the loss or grad norm is non-finite.

    `step` is the number of the step being taken (1-based); `stats` may be None; `mtp` is the config's mtp
    section (its loss is added when mtp.train).
    """
    world, accum = accelerator.num_processes, len(group)
    step_tokens, input_tokens = count_tokens(group, accelerator)
    train_mtp = mtp is not None and mtp.train
    if train_mtp:
        mtp_tokens = accelerator.reduce(torch.tensor(sum(mtp_target_tokens(b) for b in group),
                                                     device=accelerator.device), "sum").clamp(min=1)
        mtp_total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    loss_total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in group:
        with accelerator.accumulate(model):
            if stats is not None:
                stats.begin_microbatch(batch["token_mask"])
            # Undo Accelerate's 1/accum and DDP's 1/world: the step's loss is sum / all target tokens. With
            # sequence parallelism `loss` is this process's slice of the rows, and the average over every
            # process sums a group's partial gradients (glmkit/train/sequence_parallel.py).
            if train_mtp:
                loss, draft = lm_and_mtp_loss_sums(model, batch, mtp.grad_to_trunk)
                mtp_total += draft.detach().double()
                accelerator.backward((loss / step_tokens.clamp(min=1) + mtp.loss_weight * draft / mtp_tokens)
                                     * (world * accum))
            else:
                loss = loss_sum(model, batch)
                accelerator.backward(loss * (world * accum) / step_tokens.clamp(min=1))
            if stats is not None:
                stats.commit_microbatch()
            loss_total += loss.detach().double()
            maybe_kill("mid_step", step)
    step_loss = (accelerator.reduce(loss_total, "sum") / step_tokens.clamp(min=1)).item()
    mtp_loss = (accelerator.reduce(mtp_total, "sum") / mtp_tokens).item() if train_mtp else None
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    step_loss = injected_nan(step, step_loss)
    applied = math.isfinite(step_loss) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=step_loss, grad_norm=grad_norm, lr=lr, input_tokens=input_tokens, applied=applied,
                      trained_tokens=int(step_tokens.item()), mtp_loss=mtp_loss)


def mtp_fields(result: StepResult) -> dict:
    """The training record's MTP field: `mtp_loss` when the MTP layer is trained, nothing otherwise."""
    return {} if result.mtp_loss is None else {"mtp_loss": result.mtp_loss}


def check_nan_budget(consecutive: int, limit: int) -> None:
    if consecutive >= limit:
        raise FloatingPointError(f"{consecutive} consecutive steps had a non-finite loss or grad norm "
                                 f"(training.max_nan_skips={limit}); lower optimization.learning_rate or check the data")
