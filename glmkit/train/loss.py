"""The training loss without full-vocabulary logits: lm_head and cross-entropy, chunk by chunk.

The straightforward loss builds [tokens, vocab] logits in the compute dtype, an fp32 copy,
a reshaped copy of the shifted slice and its log-softmax: at GLM-4.5-Air's 151,552-token
vocabulary that is ~7.5 GB for one 4096-token row, more than the rest of a micro-step's
activations, and it grows with every row added to the micro-batch. Here the model runs up
to its final norm only; the hidden states of the tokens that have a target then go through
lm_head and the cross-entropy a chunk of tokens at a time, and backward recomputes each
chunk's logits instead of keeping them. The loss is the same sum over target tokens
(labels == IGNORE_INDEX are not targets, so neither is a document's first token), in fp32,
and so are its gradients, up to float summation order.

`reference_loss_sum` is the straightforward formula, kept as what the tests and
bench/bench_loss_memory.py hold the chunked one against.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.data.rows import IGNORE_INDEX, model_inputs

# fp32 logits per chunk: 128 MiB, i.e. 221 tokens at GLM-4.5-Air's vocabulary. Smaller chunks
# save little more (the fixed costs are the hidden states) and make thinner matmuls.
LOGITS_CHUNK_BYTES = 2**27


def chunk_tokens_for(vocab: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_i @ weight.T + bias, target_i), in fp32, chunk by chunk.

    The loss and the logits' gradient are fp32 (fp64 for fp64 inputs). Forward keeps hidden,
    weight and targets only; backward recomputes each chunk's logits,
    turns them into d(loss)/d(logits) = softmax - one_hot in place, and multiplies back.
    Gradients flow to hidden, and to weight / bias when they require them (lm_head is frozen
    in this kit, but a trainable head gets its gradient, accumulated in fp32).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        ctx.loss_dtype = loss_dtype(hidden)
        total = torch.zeros((), dtype=ctx.loss_dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start:start + chunk], weight, bias)
            total += F.cross_entropy(logits.to(ctx.loss_dtype), targets[start:start + chunk],
                                     ignore_index=IGNORE_INDEX, reduction="sum")
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        acc = ctx.loss_dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            grad = F.linear(h, weight, bias).to(acc)
            grad = grad.sub_(grad.logsumexp(dim=-1, keepdim=True)).exp_()  # softmax, in place
            rows = torch.arange(t.shape[0], device=t.device)
            target = t != IGNORE_INDEX
            grad[rows[target], t[target]] -= 1.0
            grad[~target] = 0.0
            grad = grad.mul_(grad_total).to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:start + ctx.chunk] = grad @ weight
            if need_weight:
                grad_weight += (grad.t() @ h).to(acc)
            if need_bias:
                grad_bias += grad.to(acc).sum(dim=0)
            del grad
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (gradient checks): never below fp32."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _chunk_loss(head, hidden, targets):
    return F.cross_entropy(head(hidden).to(loss_dtype(hidden)), targets, ignore_index=IGNORE_INDEX,
                           reduction="sum")


def linear_cross_entropy_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                             chunk_tokens: int | None = None) -> torch.Tensor:
    """sum of cross_entropy(head(hidden), targets) over rows, never holding more than one chunk of logits.

    hidden [N, H] and targets [N]. A plain nn.Linear head runs in ChunkedLinearCrossEntropy;
    any other head (LoRA on lm_head, say) gets the same chunks, each checkpointed.
    """
    chunk = chunk_tokens or chunk_tokens_for(head.weight.shape[0])
    if type(head) is nn.Linear:
        return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), dtype=loss_dtype(hidden), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, head, hidden[start:start + chunk], targets[start:start + chunk],
                                   use_reentrant=False)
    return total


@torch.no_grad()
def loss_and_greedy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                    chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross_entropy(head(hidden), targets), argmax of each row's logits), chunk by chunk, no gradient.

    For evaluations that also need the greedy tokens (glmkit/train/mtp.py): the same chunks and the same
    arithmetic as ChunkedLinearCrossEntropy's forward, so the loss is the training loss's to the bit."""
    chunk = chunk_tokens or chunk_tokens_for(head.weight.shape[0])
    total = torch.zeros((), dtype=loss_dtype(hidden), device=hidden.device)
    greedy = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows = hidden[start:start + chunk]
        logits = F.linear(rows, head.weight, head.bias) if type(head) is nn.Linear else head(rows)
        total += F.cross_entropy(logits.to(total.dtype), targets[start:start + chunk], ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        greedy[start:start + chunk] = logits.argmax(dim=-1)
        del logits
    return total, greedy


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: the token each position predicts (the next label), IGNORE_INDEX at the end."""
    ignore = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], ignore], dim=1)


def batch_targets(batch: dict) -> torch.Tensor:
    """[B, L]: the token each position of a batch predicts. A slice of a row (sequence parallelism,
    glmkit/train/sequence_parallel.py) carries its `targets`, shifted over the whole row; else from `labels`."""
    return batch["targets"] if "targets" in batch else shifted_targets(batch["labels"])


def next_token_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                        chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed next-token loss from final hidden states [B, L, H]; only positions with a target go through lm_head."""
    return target_loss_sum(hidden, head, shifted_targets(labels), chunk_tokens)


def target_loss_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed loss of hidden states [B, L, H] against `targets` [B, L] (IGNORE_INDEX: no target there)."""
    targets = targets.reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return linear_cross_entropy_sum(flat.index_select(0, rows), head, targets.index_select(0, rows), chunk_tokens)


def reference_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary formula the chunked loss replaces (logits, fp32 upcast, shifted cross-entropy)."""
    logits = head(hidden)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


# ---------------------------------------------------------------------------
# The model's forward up to its final norm
# ---------------------------------------------------------------------------

def output_head(model) -> nn.Module:
    """lm_head of a model, through DDP / Accelerate and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model.get_output_embeddings()


@contextlib.contextmanager
def head_skipped(head: nn.Module):
    """The model's forward returns its final hidden states as `logits`, for the chunked loss to consume.

    The forward must still go through the (possibly DDP-wrapped) top module, which is what
    sets up gradient synchronisation, so lm_head's forward is bypassed for the duration
    rather than the inner model called directly. The parameters stay where they are.
    """
    head.forward = _identity
    try:
        yield head
    finally:
        del head.forward


def _identity(hidden_states):
    return hidden_states


def causal_lm_loss_sum(model, batch: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """The training and evaluation loss of a batch: summed over its target tokens, fp32."""
    with head_skipped(output_head(model)) as head:
        hidden = model(**model_inputs(batch), use_cache=False).logits
    return target_loss_sum(hidden, head, batch_targets(batch), chunk_tokens)
