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

from glmkit.train.sequence_parallel import single_process_layout
from glmkit.train.step import loss_sum, target_tokens


@dataclass(frozen=True)
class EvalResult:
    val_loss: float
    perplexity: float
    val_tokens: int


@torch.no_grad()
def evaluate(model, val_rows, collator, accelerator, micro_batch: int, layout=None) -> EvalResult:
    """`layout`: the run's SequenceParallel (glmkit/train/sequence_parallel.py); None: every process its own rows.
    The rows are dealt among its groups, and each process evaluates its slice of them."""
    layout = layout or single_process_layout(accelerator)
    # The unwrapped model: DDP's forward syncs buffers, and the shards may differ by a batch.
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    shard = range(layout.data_rank, len(val_rows), layout.data_groups)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    # before any forward: a collective between forwards would meet another rank's all-gather
    missing = _missing_forwards(model, accelerator, -(-len(shard) // micro_batch))

    def on_device(rows):
        return layout.local_batch({k: v.to(accelerator.device) for k, v in collator(rows).items()})

    for start in range(0, len(shard), micro_batch):
        batch = on_device([val_rows[i] for i in shard[start:start + micro_batch]])
        total[0] += loss_sum(model, batch).double()
        total[1] += target_tokens(batch)
    for _ in range(missing):
        # FSDP gathers each layer with every rank at once: a rank whose shard ran out joins with an unused batch
        # (a whole group at once: its processes hold the same rows, so they run short together)
        loss_sum(model, on_device([val_rows[0]]))
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    tokens = int(total[1].item())
    val_loss = float(total[0].item()) / tokens if tokens else float("nan")
    perplexity = math.exp(val_loss) if val_loss < 700 else float("inf")
    return EvalResult(val_loss=val_loss, perplexity=perplexity, val_tokens=tokens)


def evaluate_sets(model, eval_rows: dict, collator, accelerator, micro_batch: int,
                  layout=None) -> dict[str, EvalResult]:
    """{set name: its result}, in the sets' order."""
    return {name: evaluate(model, rows, collator, accelerator, micro_batch, layout)
            for name, rows in eval_rows.items()}


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
