"""Packed attention without a dense mask: `model.attn_implementation: varlen`.

A packed row holds several documents. With sdpa the kit keeps them apart with a 4-D
block-diagonal mask, which costs the whole L x L square per head: no kernel can skip the
blocks a mask forbids, the CUDA flash kernel refuses any mask (so sdpa falls back to a
slower kernel), and transformers expands K/V to every query head (`repeat_kv`) whenever
a mask is given. Here the rows carry `cu_seqlens` instead: the flattened [rows x length]
tokens cut into segments (documents, pieces of documents, and runs of padding), and each
segment attends causally to itself only, with K/V left at their own head count (GQA).

- On CUDA in bf16/fp16 this calls torch's `torch.nn.attention.varlen.varlen_attn` (the
  flash-attention 2 varlen kernel shipped in the CUDA wheel, with its backward).
- Anywhere else (the CPU, fp32) the same call runs sdpa once per segment length: every
  segment of one length in one causal sdpa call, K/V not expanded (`enable_gqa`). It is
  the reference the tests hold against the masked sdpa path, and it skips the masked-out
  work on CPU too.
- Under sequence parallelism (`distributed.sequence_parallel`) a process holds a slice of
  every row; an all-to-all before and after gives this function its share of the heads over
  whole rows (glmkit/model/sequence_parallel.py), so it runs unchanged.

The collator builds `cu_seqlens` / `max_seqlen` from the per-document positions
(`packed_segments`); `model_kwargs` turns them into the keyword arguments transformers
passes down to every attention call (the same names its flash-attention path reads).

Values may be narrower (or wider) than queries and keys: multi-head latent attention
(GLM-4.7-Flash's class, Glm4MoeLiteAttention) allows a v head dim other than the q/k one
(DeepSeek-V3: 128 against 192). The flash kernel takes one head dim for all three, and sdpa on
CPU takes its memory-lean kernel only then, so the narrower side is zero-padded and the output
cropped back (`with_matched_head_dims`), as transformers' own flash-attention path does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmkit.model.sequence_parallel import this_slice_every_head, whole_rows_some_heads

NAME = "varlen"
# dtypes the CUDA flash kernel takes; fp32 on CUDA runs the per-segment path.
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------
# Segments of a packed batch
# ---------------------------------------------------------------------------

def packed_segments(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens int32 [segments + 1], max_seqlen 0-d int64) of the flattened [rows x length] batch.

    `positions` is [rows, length], each token's position inside its document and -1 on
    padding. A segment starts at every position 0, at the first pad of a run, and at the
    start of every row (a document that spills over a row boundary restarts at 0 there).
    Padding is a segment of its own, so every query attends to at least itself.
    """
    rows, length = positions.shape
    pad = positions < 0
    starts = positions == 0
    starts[:, 1:] |= pad[:, 1:] & ~pad[:, :-1]
    starts[:, 0] = True
    first = starts.reshape(-1).nonzero().flatten()
    cu_seqlens = torch.cat([first, first.new_tensor([rows * length])])
    max_seqlen = (cu_seqlens[1:] - cu_seqlens[:-1]).max()
    return cu_seqlens.to(torch.int32), max_seqlen


def model_kwargs(cu_seqlens: torch.Tensor, max_seqlen: torch.Tensor | int) -> dict:
    """Keyword arguments for the model's forward; transformers hands them to every attention call."""
    longest = int(max_seqlen)
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": longest,
            "max_length_k": longest}


# ---------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------

def uses_flash_kernel(query: torch.Tensor, value: torch.Tensor | None = None) -> bool:
    widest = max(query.shape[-1], value.shape[-1] if value is not None else 0)
    return query.is_cuda and query.dtype in FLASH_DTYPES and widest <= FLASH_MAX_HEAD_DIM


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, scale: float | None) -> torch.Tensor:
    """Causal attention within each segment. query/key [T, Hq|Hkv, D], value [T, Hkv, Dv] -> [T, Hq, Dv]."""
    # Both paths pad a v head dim other than q/k's: the flash kernel needs one head dim, and sdpa on CPU would
    # otherwise fall back to its math kernel, which keeps every segment's L x L probabilities for backward.
    attend = _flash_varlen if uses_flash_kernel(query, value) else _segments_by_length
    return with_matched_head_dims(attend, query, key, value, cu_seqlens, max_seqlen, scale)


def _flash_varlen(query, key, value, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                       window_size=(-1, 0), enable_gqa=True)


def with_matched_head_dims(attend, query, key, value, cu_seqlens, max_seqlen, scale):
    """`attend` (a kernel that wants one head dim for q, k and v) on tensors whose v head dim differs from q/k's.

    A narrower v is zero-padded to q/k's width: P @ [V, 0] = [P @ V, 0], and the padding is cropped off the
    output. A narrower q/k is zero-padded to v's: the scores q . k are unchanged, and so is the scale, which is
    fixed first from the real q/k width. Gradients flow back through the pad and crop to the real columns only."""
    qk_dim, v_dim = query.shape[-1], value.shape[-1]
    if qk_dim == v_dim:
        return attend(query, key, value, cu_seqlens, max_seqlen, scale)
    scale = qk_dim ** -0.5 if scale is None else scale
    if v_dim < qk_dim:
        out = attend(query, key, F.pad(value, (0, qk_dim - v_dim)), cu_seqlens, max_seqlen, scale)
        return out[..., :v_dim]
    pad = (0, v_dim - qk_dim)
    return attend(F.pad(query, pad), F.pad(key, pad), value, cu_seqlens, max_seqlen, scale)


def _segments_by_length(query, key, value, cu_seqlens, max_seqlen, scale):
    """The portable path: one causal sdpa call per distinct segment length (`max_seqlen` unused: the flash kernel's
    arguments)."""
    bounds = cu_seqlens.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        starts_by_length.setdefault(end - start, []).append(start)
    device = query.device
    outputs, order = [], []
    for length, starts in starts_by_length.items():
        # [segments, length] token indices, gathered into [segments, heads, length, dim].
        index = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)
        q, k, v = (t[index].transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        outputs.append(out.transpose(1, 2).reshape(-1, query.shape[1], value.shape[-1]))
        order.append(index.reshape(-1))
    if len(outputs) == 1:  # one length: the segments tile the batch in order already
        return outputs[0]
    order = torch.cat(order)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    return torch.cat(outputs).index_select(0, inverse)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens_q=None, max_length_q=None,
                             sequence_group=None, **kwargs):
    """transformers' attention-function signature: query/key [B, Hq|Hkv, L, D], value [B, Hkv, L, Dv]
    -> ([B, L, Hq, Dv], None). Without cu_seqlens (generation, an unpacked row) each row is one
    causal sequence, which is what sdpa does without a mask.

    With `sequence_group` the rows are split over that group's processes (sequence parallelism) and L is
    this process's slice; cu_seqlens are the whole rows'. The heads are traded for the rest of the rows
    before attention and back after (glmkit/model/sequence_parallel.py)."""
    if cu_seq_lens_q is None:
        if sequence_group is not None:
            raise ValueError("sequence-parallel attention needs the whole rows' cu_seqlens")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("varlen attention has no attention dropout; the model's attention_dropout must be 0")
    # -- sequence parallel: this process's heads of the whole rows
    if sequence_group is not None:
        query, key, value = (whole_rows_some_heads(t, sequence_group) for t in (query, key, value))
    batch, heads, length, _ = query.shape
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[-1]) for t in (query, key, value)]
    out = segment_attention(*flat, cu_seq_lens_q, int(max_length_q), scaling)
    out = out.view(batch, length, heads, value.shape[-1])
    # -- sequence parallel: back to this process's slice, every head
    if sequence_group is not None:
        out = this_slice_every_head(out, sequence_group)
    return out, None


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent).

    No mask function is registered with it on purpose: for an implementation without one,
    transformers builds no mask at all (a mask from packed position_ids would be the very
    L x L tensor this path exists to avoid).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
