"""Evaluation: the token-weighted loss over every eval set, every process a shard of each.

The sets are the held-out split of the training data (`val`) and the named `eval.sets`
(glmkit/data/eval_sets.py). One eval measures all of them; `eval.select_by` names the one whose
loss picks the best adapter and ranks checkpoints. An eval record carries each set's numbers as
`<set>/loss`, `<set>/perplexity`, `<set>/tokens` (trackers: `eval/<set>/loss`), plus the
selection set's as `val_loss`, `perplexity`, `val_tokens`, the fields logs had before eval sets
existed (the held-out split's, with the default selection).

A model with an MTP layer (glmkit/model/mtp.py) is measured with it at every eval, trained or not: each
set's `<set>/mtp_acceptance` (the share of drafts greedy speculative decoding would accept) and
`<set>/mtp_loss` (glmkit/train/mtp.py), so the drift of the draft head shows while the trunk moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glmkit.model.mtp import has_mtp
from glmkit.train.mtp import eval_sums
from glmkit.train.sequence_parallel import single_process_layout
from glmkit.train.step import loss_sum, target_tokens


@dataclass(frozen=True)
class EvalResult:
    val_loss: float
    perplexity: float
    val_tokens: int
    mtp_loss: float | None = None        # None: the model has no MTP layer
    mtp_acceptance: float | None = None  # accepted drafts / positions with an MTP target
    mtp_positions: int = 0


def batches_here(rows, layout, micro_batch: int) -> int:
    """How many micro-batches of `rows` this process evaluates (its group's shard: every data_groups-th row)."""
    shard = range(layout.data_rank, len(rows), layout.data_groups)
    return -(-len(shard) // micro_batch)


@torch.no_grad()
def evaluate(model, val_rows, collator, accelerator, micro_batch: int, on_batch=None, layout=None) -> EvalResult:
    """The token-weighted loss of `val_rows`; `on_batch()` after each micro-batch here. `layout`: the run's
    SequenceParallel (glmkit/train/sequence_parallel.py); None: every process its own rows. The rows are dealt
    among its groups, and each process evaluates its slice of them."""
    layout = layout or single_process_layout(accelerator)
    # The unwrapped model: DDP's forward syncs buffers, and the shards may differ by a batch.
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    shard = range(layout.data_rank, len(val_rows), layout.data_groups)
    # The MTP layer's targets lie two tokens ahead, across a slice's end: it is measured without sequence
    # parallelism only (distributed.sequence_parallel 1; docs/MTP.md).
    with_mtp = has_mtp(model) and layout.size == 1
    # loss sum, its tokens; MTP loss sum, positions, accepted drafts
    total = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    # before any forward: a collective between forwards would meet another rank's all-gather
    missing = _missing_forwards(model, accelerator, -(-len(shard) // micro_batch))

    def on_device(rows):
        return layout.local_batch({k: v.to(accelerator.device) for k, v in collator(rows).items()})

    for start in range(0, len(shard), micro_batch):
        batch = on_device([val_rows[i] for i in shard[start:start + micro_batch]])
        if with_mtp:
            sums = eval_sums(model, batch)
            total[0] += sums.lm_loss.double()
            total[2:] += torch.tensor([sums.mtp_loss.item(), sums.mtp_positions, sums.mtp_accepted],
                                      dtype=torch.float64, device=total.device)
        else:
            total[0] += loss_sum(model, batch).double()
        total[1] += target_tokens(batch)
        if on_batch is not None:
            on_batch()
    for _ in range(missing):
        # FSDP gathers each layer with every rank at once: a rank whose shard ran out joins with an unused batch
        # (a whole group at once: its processes hold the same rows, so they run short together)
        batch = on_device([val_rows[0]])
        eval_sums(model, batch) if with_mtp else loss_sum(model, batch)
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    tokens = int(total[1].item())
    val_loss = float(total[0].item()) / tokens if tokens else float("nan")
    perplexity = math.exp(val_loss) if val_loss < 700 else float("inf")
    if not with_mtp:
        return EvalResult(val_loss=val_loss, perplexity=perplexity, val_tokens=tokens)
    positions = int(total[3].item())
    return EvalResult(val_loss=val_loss, perplexity=perplexity, val_tokens=tokens,
                      mtp_loss=float(total[2].item()) / positions if positions else float("nan"),
                      mtp_acceptance=float(total[4].item()) / positions if positions else float("nan"),
                      mtp_positions=positions)


def evaluate_sets(model, eval_rows: dict, collator, accelerator, micro_batch: int,
                  on_batch=None, layout=None) -> dict[str, EvalResult]:
    """{set name: its result}, in the sets' order; `on_batch(set name)` after each micro-batch on this process."""
    return {name: evaluate(model, rows, collator, accelerator, micro_batch,
                           on_batch=(lambda name=name: on_batch(name)) if on_batch else None, layout=layout)
            for name, rows in eval_rows.items()}


def eval_line(step: int, losses: dict[str, float], baseline: dict[str, float], seconds: float,
              acceptance: dict[str, float] | None = None) -> str:
    """The console's line for a finished eval: every set's loss and its change since the step-0 baseline, and
    the MTP layer's speculative acceptance where the model has one."""
    parts = []
    for name, loss in losses.items():
        since = baseline.get(name)
        change = f" ({loss - since:+.4f} since step 0)" if since is not None and step > 0 else ""
        accepted = (acceptance or {}).get(name)
        drafts = f", MTP acceptance {accepted:.1%}" if accepted is not None and math.isfinite(accepted) else ""
        parts.append(f"{name} {loss:.4f}{change}{drafts}")
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
        if result.mtp_acceptance is not None:
            fields.update({f"{name}/mtp_acceptance": result.mtp_acceptance, f"{name}/mtp_loss": result.mtp_loss,
                           f"{name}/mtp_positions": result.mtp_positions})
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
