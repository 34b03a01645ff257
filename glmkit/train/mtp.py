"""The MTP layer's objective and its speculative acceptance: what the trainer adds for the draft head.

At position j the MTP layer (glmkit/model/mtp.py) predicts token j+2 from the trunk's hidden state at j
and token j+1. Greedy speculative decoding with one draft token accepts the draft when it equals the
token the model itself picks for j+2, its greedy next token at position j+1. So the acceptance measured
here is the share of positions where argmax(MTP logits at j) == argmax(trunk logits at j+1): what the
servers' MTP speculative decoding accepts on this text, with the real tokens fed in. Its loss is the
cross-entropy of token j+2 at the same positions.

Positions count only where j+1 and j+2 are in j's document (a packed row's documents never predict
across each other) and token j+2 is a training target (a masked prompt token is never drafted for).
The losses go through lm_head a chunk of tokens at a time, as the language-modelling loss does
(glmkit/train/loss.py): no full-vocabulary logits for a whole row, the greedy tokens kept as integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmkit.data.rows import IGNORE_INDEX, model_inputs
from glmkit.model.mtp import mtp_forward
from glmkit.train.loss import (
    head_skipped,
    linear_cross_entropy_sum,
    loss_and_greedy,
    next_token_loss_sum,
    output_head,
    shifted_targets,
)


def mtp_targets(batch: dict) -> torch.Tensor:
    """[B, L]: token j+2 at each position j whose next two tokens continue its document, else IGNORE_INDEX."""
    labels = batch["labels"]
    targets = torch.full_like(labels, IGNORE_INDEX)
    if labels.shape[1] < 3:
        return targets
    if "position_ids" in batch:  # packed rows: each document's positions restart at 0
        starts = batch["position_ids"] == 0
    else:  # one document per row
        starts = torch.zeros_like(labels, dtype=torch.bool)
        starts[:, 0] = True
    same_document = ~starts[:, 1:-1] & ~starts[:, 2:]
    targets[:, :-2] = labels[:, 2:].masked_fill(~same_document, IGNORE_INDEX)
    return targets


def mtp_target_tokens(batch: dict) -> int:
    return int((mtp_targets(batch) != IGNORE_INDEX).sum())


def _rows(targets: torch.Tensor) -> torch.Tensor:
    return (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def _select(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


def lm_and_mtp_loss_sums(model, batch: dict, grad_to_trunk: bool = False,
                         chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(language-modelling loss sum, MTP loss sum) of a batch, one forward, each summed over its own targets."""
    with head_skipped(output_head(model)) as head, mtp_forward(model, grad_to_trunk) as mtp:
        hidden = model(**model_inputs(batch), use_cache=False).logits
    lm = next_token_loss_sum(hidden, head, batch["labels"], chunk_tokens)
    targets = mtp_targets(batch)
    rows = _rows(targets)
    draft = linear_cross_entropy_sum(_select(mtp.hidden, rows), head, targets.reshape(-1).index_select(0, rows),
                                     chunk_tokens)
    return lm, draft


@dataclass(frozen=True)
class EvalSums:
    """One batch's sums for an eval: the language-modelling loss, and the MTP layer's loss and accepted drafts."""
    lm_loss: torch.Tensor       # summed over the next-token targets
    mtp_loss: torch.Tensor      # summed over the MTP targets
    mtp_positions: int          # positions with an MTP target: where a draft is checked
    mtp_accepted: int           # of those, where the draft equals the model's own greedy token


@torch.no_grad()
def eval_sums(model, batch: dict, chunk_tokens: int | None = None) -> EvalSums:
    """The eval's sums with the MTP layer run beside the trunk; the language-modelling loss is the one
    glmkit/train/loss.py computes, to the bit, and the greedy tokens come from the same chunks of logits."""
    with head_skipped(output_head(model)) as head, mtp_forward(model) as mtp:
        hidden = model(**model_inputs(batch), use_cache=False).logits
    lm_targets = shifted_targets(batch["labels"]).reshape(-1)
    lm_rows = _rows(lm_targets)
    lm, lm_greedy = loss_and_greedy(_select(hidden, lm_rows), head, lm_targets.index_select(0, lm_rows),
                                    chunk_tokens)
    greedy = torch.full_like(lm_targets, -1)
    greedy[lm_rows] = lm_greedy  # the model's own next token at every position that has one
    targets = mtp_targets(batch).reshape(-1)
    rows = _rows(targets)
    draft_loss, drafts = loss_and_greedy(_select(mtp.hidden, rows), head, targets.index_select(0, rows),
                                         chunk_tokens)
    # The draft for j+2 (made at j) against the model's own token for j+2 (its greedy next token at j+1).
    accepted = int((drafts == greedy.index_select(0, rows + 1)).sum())
    return EvalSums(lm, draft_loss, int(rows.numel()), accepted)
