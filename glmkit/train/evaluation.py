"""Evaluation: the token-weighted loss over every eval set, every process a shard of each.

The sets are the held-out split of the training data (`val`) and the named `eval.sets`
(glmkit/data/eval_sets.py). One eval measures all of them; `eval.select_by` names the one whose
loss picks the best adapter and ranks checkpoints. An eval record carries each set's numbers as
`<set>/loss`, `<set>/perplexity`, `<set>/tokens` (trackers: `eval/<set>/loss`), plus the
selection set's as `val_loss`, `perplexity`, `val_tokens`, the fields logs had before eval sets
existed (the held-out split's, with the default selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glmkit.train.step import loss_sum, target_tokens


@dataclass(frozen=True)
class EvalResult:
    val_loss: float
    perplexity: float
    val_tokens: int


def batches_here(rows, accelerator, micro_batch: int) -> int:
    """How many micro-batches of `rows` this process evaluates (its shard is every num_processes-th row)."""
    shard = range(accelerator.process_index, len(rows), accelerator.num_processes)
    return -(-len(shard) // micro_batch)


@torch.no_grad()
def evaluate(model, val_rows, collator, accelerator, micro_batch: int, on_batch=None) -> EvalResult:
    """The token-weighted loss of `val_rows`, every process a shard; `on_batch()` after each micro-batch here."""
    # The unwrapped model: DDP's forward syncs buffers, and the shards may differ by a batch.
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    shard = range(accelerator.process_index, len(val_rows), accelerator.num_processes)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    # before any forward: a collective between forwards would meet another rank's all-gather
    missing = _missing_forwards(model, accelerator, -(-len(shard) // micro_batch))
    for start in range(0, len(shard), micro_batch):
        batch = collator([val_rows[i] for i in shard[start:start + micro_batch]])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        total[0] += loss_sum(model, batch).double()
        total[1] += target_tokens(batch)
        if on_batch is not None:
            on_batch()
    for _ in range(missing):
        # FSDP gathers each layer with every rank at once: a rank whose shard ran out joins with an unused batch
        batch = collator([val_rows[0]])
        loss_sum(model, {k: v.to(accelerator.device) for k, v in batch.items()})
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    tokens = int(total[1].item())
    val_loss = float(total[0].item()) / tokens if tokens else float("nan")
    perplexity = math.exp(val_loss) if val_loss < 700 else float("inf")
    return EvalResult(val_loss=val_loss, perplexity=perplexity, val_tokens=tokens)


def evaluate_sets(model, eval_rows: dict, collator, accelerator, micro_batch: int,
                  on_batch=None) -> dict[str, EvalResult]:
    """{set name: its result}, in the sets' order; `on_batch(set name)` after each micro-batch on this process."""
    return {name: evaluate(model, rows, collator, accelerator, micro_batch,
                           on_batch=(lambda name=name: on_batch(name)) if on_batch else None)
            for name, rows in eval_rows.items()}


def eval_line(step: int, losses: dict[str, float], baseline: dict[str, float], seconds: float) -> str:
    """The console's line for a finished eval: every set's loss and its change since the step-0 baseline."""
    parts = []
    for name, loss in losses.items():
        since = baseline.get(name)
        change = f" ({loss - since:+.4f} since step 0)" if since is not None and step > 0 else ""
        parts.append(f"{name} {loss:.4f}{change}")
    label = "baseline eval (step 0, before any update)" if step == 0 else f"eval at step {step}"
    return f"{label}, {seconds:.1f} s: " + "; ".join(parts)


def eval_record(results: dict[str, EvalResult], select_by: str) -> dict:
    """An eval_log.jsonl record's fields (step and time added by the log)."""
    selected = results[select_by]
    fields = {"val_loss": selected.val_loss, "perplexity": selected.perplexity, "val_tokens": selected.val_tokens,
              "select_by": select_by, "sets": list(results)}
    for name, result in results.items():
        fields.update({f"{name}/loss": result.val_loss, f"{name}/perplexity": result.perplexity,
                       f"{name}/tokens": result.val_tokens})
    return fields


def _missing_forwards(model, accelerator, batches: int) -> int:
    """How many forwards short of the busiest rank this one is, under FSDP (0 otherwise: DDP's eval is local)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return 0
    most = accelerator.reduce(torch.tensor(batches, device=accelerator.device), "max")
    return int(most.item()) - batches


def improves(val_loss: float, best: float | None) -> bool:
    return math.isfinite(val_loss) and (best is None or val_loss < best)


def adapter_is_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
