"""AdamW over the LoRA weights and the learning-rate schedule: warmup, then cosine/linear decay to a floor.

On resume the optimizer's moments and the scheduler's position come from the checkpoint, but
the hyperparameters come from the current config (`apply_current_hyperparameters`), so a
changed learning rate, floor, weight decay, beta, epsilon or step count takes effect from the
first resumed step, as the resume check's "allowed" list promises.
"""

from __future__ import annotations

import math

import torch


def lr_lambda(kind: str, warmup: int, total: int, floor: float):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * shape
    return factor


def _hyperparameters(o) -> dict:
    return {"lr": o.learning_rate, "betas": (o.adam_beta1, o.adam_beta2), "eps": o.adam_epsilon,
            "weight_decay": o.weight_decay}


def make_optimizer_and_scheduler(model, cfg, total_steps: int):
    o = cfg.optimization
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **_hyperparameters(o))
    schedule = lr_lambda(o.lr_scheduler, o.warmup_steps, total_steps, o.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def apply_current_hyperparameters(optimizer, scheduler, cfg) -> None:
    """After loading a checkpoint: the config's hyperparameters replace the saved ones.

    The saved param groups and the scheduler's base LRs would otherwise win. The schedule's
    shape (kind, warmup, total steps, floor) is the config's already: LambdaLR does not save
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
