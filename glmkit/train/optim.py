"""AdamW over the LoRA weights and the learning-rate schedule: warmup, then cosine/linear decay to a floor,
a constant rate, or warmup-stable-decay (`wsd`: the peak until the final steps, then a decay to the floor).

On resume the optimizer's moments and the scheduler's position come from the checkpoint, but
the hyperparameters come from the current config (`apply_current_hyperparameters`), so a
changed learning rate, floor, weight decay, beta, epsilon or step count takes effect from the
first resumed step, as the resume check's "allowed" list promises.
"""

from __future__ import annotations

import math

import torch

DECAY_SHAPES = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "sqrt": lambda progress: 1.0 - math.sqrt(progress),
}


def wsd_decay_steps(total: int, warmup: int, decay_steps: int | None, decay_fraction: float) -> int:
    """The length of a wsd run's final decay: the configured steps, or the configured share of the run,
    at least one step and never reaching into the warmup."""
    wanted = decay_steps if decay_steps else round(decay_fraction * total)
    return max(1, min(wanted, total - warmup))


def lr_lambda(kind: str, warmup: int, total: int, floor: float, decay: int = 0, shape: str = "linear"):
    """The factor on the peak LR that optimizer step `step` + 1 uses (LambdaLR counts steps done).

    `decay` and `shape` are wsd's: the decay starts `decay` steps before the end (its first step
    still at the peak), follows `shape` and ends one step short of the floor, as cosine and linear do.
    """
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        if kind == "wsd":
            start = total - decay
            if step < start:
                return 1.0
            return floor + (1.0 - floor) * DECAY_SHAPES[shape](min(1.0, (step - start) / decay))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * DECAY_SHAPES["cosine" if kind == "cosine" else "linear"](progress)
    return factor


def schedule_for(o, total_steps: int):
    """The config's schedule as a LambdaLR function (rebuilt from the config on every start and resume)."""
    decay = wsd_decay_steps(total_steps, o.warmup_steps, o.decay_steps, o.decay_fraction) \
        if o.lr_scheduler == "wsd" else 0
    return lr_lambda(o.lr_scheduler, o.warmup_steps, total_steps, o.min_lr_ratio, decay, o.decay_shape)


def _hyperparameters(o) -> dict:
    return {"lr": o.learning_rate, "betas": (o.adam_beta1, o.adam_beta2), "eps": o.adam_epsilon,
            "weight_decay": o.weight_decay}


def make_optimizer_and_scheduler(model, cfg, total_steps: int):
    o = cfg.optimization
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **_hyperparameters(o))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_for(o, total_steps))


def apply_current_hyperparameters(optimizer, scheduler, cfg) -> None:
    """After loading a checkpoint: the config's hyperparameters replace the saved ones.

    The saved param groups and the scheduler's base LRs would otherwise win. The schedule's
    shape (kind, warmup, total steps, floor, wsd's decay) is the config's already: LambdaLR does not save
    a plain function.
    """
    hyper = _hyperparameters(cfg.optimization)
    for group in optimizer.param_groups:
        group.update(hyper, initial_lr=hyper["lr"])
    scheduler.base_lrs = [hyper["lr"] for _ in optimizer.param_groups]
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, factors):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
