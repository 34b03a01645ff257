"""Attention over rows split across processes: the all-to-all exchanges of Ulysses sequence parallelism.

Under `distributed.sequence_parallel: P` the P processes of a group hold contiguous slices of the same rows
(glmkit/train/sequence_parallel.py cuts them). Everything in a decoder layer but attention works token by
token, so it runs on the slice. Attention needs whole rows; it gets them by trading heads for tokens:

    q, k, v [B, H, L/P, D]  --all-to-all-->  [B, H/P, L, D]   every token of the rows, 1/P of the heads
    varlen attention over the whole rows' cu_seqlens (glmkit/model/attention.py), unchanged
    output [B, L, H/P, D]   --all-to-all-->  [B, L/P, H, D]   back to this slice, every head

Each process sends (P-1)/P of q, k, v and the output and receives as much. The heads are cut into P
contiguous blocks, query and key/value heads alike, so with grouped-query attention the query heads of a
block find their KV heads in the same block: P must divide the KV heads. The exchange is its own adjoint
(the backward is the same exchange with the two dimensions swapped), so gradients reach the process that
owns each token, and a recomputed layer (gradient checkpointing) simply exchanges again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Cut `x` into `size` blocks along `scatter_dim`, send block i to the group's i-th process, and join the
    blocks received, in the senders' order, along `gather_dim`. One all_to_all_single."""
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim))  # [size, ...]: the block for process i at i
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return exchange(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def whole_rows_some_heads(states: torch.Tensor, group) -> torch.Tensor:
    """q, k or v of this slice [B, H, L/P, D] -> this process's heads of the whole rows [B, H/P, L, D]."""
    return _Exchange.apply(states, group, 1, 2)


def this_slice_every_head(output: torch.Tensor, group) -> torch.Tensor:
    """Attention output [B, L, H/P, D] of this process's heads -> this slice's tokens, every head [B, L/P, H, D]."""
    return _Exchange.apply(output, group, 1, 2)


# distributed.sequence_parallel's choices (the config's Literal): a group of up to 8 fits one node's NVLink.
SIZES = (1, 2, 4, 8)


def check_heads(query_heads: int, kv_heads: int, size: int) -> str | None:
    """Why P processes cannot split these heads, or None when they can."""
    if kv_heads % size or query_heads % size:
        return (f"the model has {kv_heads} KV heads ({query_heads} query heads), which {size} processes cannot "
                f"share out evenly")
    return None


def sizes_that_split(query_heads: int | None = None, kv_heads: int | None = None,
                     processes: int | None = None) -> list[int]:
    """The sizes in SIZES that split these heads and divide this many processes (each when given)."""
    return [p for p in SIZES if (processes is None or processes % p == 0)
            and (query_heads is None or not check_heads(query_heads, kv_heads, p))]
