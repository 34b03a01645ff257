"""Activation memory of one micro-batch: per layer under gradient checkpointing, attention and loss per implementation.

Part of the memory plan (glmkit/plan/fit.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from glmkit.model.load import DTYPES
from glmkit.plan.weights import LoraTarget, TensorInfo
from glmkit.train.loss import chunk_tokens_for

# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------

@dataclass
class Arch:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    moe_inter: int
    shared_inter: int
    dense_inter: int


def arch_of(hf_config) -> Arch:
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    moe_inter = getattr(hf_config, "moe_intermediate_size", 0) or 0
    return Arch(
        hidden=hidden,
        heads=heads,
        kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hidden // heads,
        vocab=hf_config.vocab_size,
        experts=getattr(hf_config, "n_routed_experts", None) or getattr(hf_config, "num_local_experts", 0) or 0,
        top_k=getattr(hf_config, "num_experts_per_tok", 0) or 0,
        moe_inter=moe_inter,
        shared_inter=moe_inter * (getattr(hf_config, "n_shared_experts", 0) or 0),
        dense_inter=getattr(hf_config, "intermediate_size", 0) or 0,
    )


def _norm_per_token(a: Arch, c: int) -> int:
    return (4 + c) * a.hidden  # RMSNorm saves its fp32 upcast input and its output


def attention_per_token(a: Arch, c: int) -> int:
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return (_norm_per_token(a, c)
            + c * (q + 2 * kv)   # rotated q, k and v, saved by the attention kernel
            + c * q              # attention output, saved by o_proj
            + 4 * a.heads        # log-sum-exp of the fused kernel
            + c * a.hidden)      # residual sum


def moe_per_token(a: Arch, c: int) -> int:
    routed = a.top_k * c * (3 * a.hidden + 4 * a.moe_inter)  # gathered input, gate/up, act, down, weighted
    shared = c * (4 * a.shared_inter + a.hidden)
    router = 4 * a.hidden + 2 * 4 * a.experts                # fp32 input copy, logits and sigmoid scores
    return _norm_per_token(a, c) + router + routed + shared + 2 * c * a.hidden


def dense_mlp_per_token(a: Arch, c: int) -> int:
    return _norm_per_token(a, c) + c * (4 * a.dense_inter + a.hidden) + c * a.hidden


def eager_attention_bytes(a: Arch, micro_batch: int, seq: int, c: int) -> int:
    # Eager attention materialises scores and probabilities (fp32 softmax) per head.
    return micro_batch * a.heads * seq * seq * (c + 4)


# ---------------------------------------------------------------------------
# Attention and the loss, priced per implementation
# ---------------------------------------------------------------------------

def attention_extra_bytes(a: Arch, attn: str, micro_batch: int, seq: int, c: int) -> int:
    """What one recomputed layer's attention holds beyond attention_per_token's q, k, v, output and lse.

    - varlen / flash_attention_2: nothing more; K/V stay at their own head count, no mask.
    - sdpa: the packed rows' 4-D block mask (bool, built by the collator) and the additive
      bias in the compute dtype the mask-capable kernel turns it into and keeps for
      backward, and K/V expanded to every query head (transformers' repeat_kv whenever a
      mask is given), kept for backward as the kernel's inputs.
    - eager: the scores and fp32 probabilities of every head.
    """
    if attn == "eager":
        return eager_attention_bytes(a, micro_batch, seq, c)
    if attn == "sdpa":
        mask = micro_batch * seq * seq * (1 + c)
        expanded_kv = micro_batch * seq * 2 * (a.heads - a.kv_heads) * a.head_dim * c
        return mask + expanded_kv
    return 0


def sequence_parallel_bytes(a: Arch, tokens: int, c: int, size: int) -> dict:
    """What Ulysses sequence parallelism (glmkit/model/sequence_parallel.py) adds to a layer on a process that holds
    `tokens` (its slices of the micro-batch's rows); nothing when `size` is 1.

    - saved: the attention output twice. The kernel keeps its output, this process's heads of the whole rows, for
      backward, and o_proj keeps its input, this slice's tokens with every head: one tensor without the exchange,
      two with it (q, k and v are kept once, exchanged: the same bytes as this slice's).
    - transient, while a layer's attention runs: the slice's q, k and v, still held by the attention module that
      made them, and the send and receive buffers of one exchange of the widest tensor (q, the output, or their
      gradients: heads x head_dim per token).
    """
    if size == 1:
        return {"saved": 0, "transient": 0}
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return {"saved": c * q * tokens, "transient": c * (q + 2 * kv) * tokens + 2 * c * q * tokens}


def loss_bytes(a: Arch, tokens: int, c: int, heads: int = 1) -> dict:
    """The chunked loss the trainer runs (glmkit/train/loss.py), and what the full-vocabulary one would hold.

    Chunked: the target tokens' hidden states and their gradient ([tokens, hidden] each),
    plus one chunk of logits at a time: compute-dtype logits, the fp32 copy and the
    log-softmax (forward) or softmax-minus-one-hot (backward). Full: [tokens, vocab]
    logits, the fp32 upcast and the shifted slice's reshaped copy in forward; in backward
    the saved log-softmax, the gradient it receives and the one it passes on, all fp32.
    `heads` = 2 with mtp.train: the MTP layer's hidden states go through lm_head too (one chunk at a time
    still, the two losses one after the other).
    """
    chunk = min(tokens, chunk_tokens_for(a.vocab))
    return {
        "loss_chunk_tokens": chunk,
        "logits_and_loss_bytes": heads * 2 * tokens * a.hidden * c + chunk * a.vocab * (c + 8),
        "full_vocab_loss_bytes": tokens * a.vocab * max(c + 8, 12),
    }


def layer_breakdown(model, a: Arch, cfg, targets: list[LoraTarget]) -> list[dict]:
    """Per decoder layer (and the MTP layer, with mtp.train): activations per token, its expert bytes in compute
    dtype."""
    from glmkit.model.mtp import mtp_layers

    c = DTYPES[cfg.quantization.compute_dtype].itemsize
    lora_per_layer: dict[int, int] = defaultdict(int)
    for t in targets:
        if t.layer is not None and not t.expert:
            # lora_A's input (a dropout copy plus its mask when dropout > 0) and its r outputs.
            dropout = (c + 1) * t.in_features if cfg.lora.dropout > 0 else 0
            lora_per_layer[t.layer] += dropout + c * cfg.lora.r
    blocks = list(model.model.layers)
    if cfg.mtp.train:  # trained, the MTP layer runs forward and backward every micro-step, like one more layer
        blocks += [layer.mtp_block for layer in mtp_layers(model)]
    layers = []
    for index, layer in enumerate(blocks):
        experts = getattr(layer.mlp, "experts", None)
        moe = experts is not None
        expert_numel = sum(p.numel() for p in experts.parameters()) if moe else 0
        per_token = attention_per_token(a, c) + (moe_per_token(a, c) if moe else dense_mlp_per_token(a, c))
        if index >= len(model.model.layers):  # MTP: enorm/hnorm and eh_proj's [embedding; hidden] input
            per_token += 2 * _norm_per_token(a, c) + 2 * c * a.hidden
        expert_lora = expert_lora_activations(a, c, [t for t in targets if t.expert and t.layer == index], cfg.lora)
        layers.append({"index": index, "moe": moe,
                       "per_token": per_token + lora_per_layer[index] + expert_lora["per_token"],
                       "expert_compute_bytes": expert_numel * c,
                       "expert_lora_transient_bytes": expert_lora["transient"]})
    return layers


def expert_lora_activations(a: Arch, c: int, targets: list[LoraTarget], lora) -> dict:
    """What LoRA on one layer's fused experts adds on top of the experts' own activations.

    glmkit.model.expert_lora runs it factored per routed token: per (token, expert) pair it keeps the
    r-wide low-rank input of each B matmul and makes one projection-wide output per parameter
    (gate_up: 2 x moe_intermediate, down: hidden). Per layer, in backward, the factors exist
    once more in the compute dtype and so do their gradients before they reach the fp32 ones.
    Nothing the size of an expert tensor is made: no delta, no weight gradient.
    """
    if not targets:
        return {"per_token": 0, "transient": 0}
    from glmkit.model.lora import expert_rank

    r = expert_rank(lora)[0]
    widths = {"gate_up_proj": 2 * a.moe_inter, "down_proj": a.hidden}
    per_pair = sum(c * (r + widths.get(t.name.rpartition(".")[2], a.hidden)) for t in targets)
    factors = sum(t.params for t in targets) * c
    return {"per_token": a.top_k * per_pair, "transient": 2 * factors}


def activation_plan(model, a: Arch, cfg, targets: list[LoraTarget], tensors: list[TensorInfo],
                    micro_batch: int | None = None, sequence_parallel: int | None = None,
                    offload: bool | None = None) -> dict:
    """One process's activations; `micro_batch`, `sequence_parallel` and `offload` override the config's.

    With sequence parallelism P a process holds 1/P of every row (length / P tokens of it) through the whole
    model, plus the exchange around attention (sequence_parallel_bytes)."""
    c = DTYPES[cfg.quantization.compute_dtype].itemsize
    q = cfg.quantization
    mb, seq = micro_batch or cfg.optimization.micro_batch_per_gpu, cfg.training.max_seq_length
    size = sequence_parallel or cfg.distributed.sequence_parallel
    offload = cfg.memory.offload_activations if offload is None else offload
    tokens = mb * seq // size  # this process's tokens of the micro-batch
    layers = layer_breakdown(model, a, cfg, targets)
    attention = attention_extra_bytes(a, cfg.model.attn_implementation, mb, seq, c)
    exchange = sequence_parallel_bytes(a, tokens, c, size)
    saved = [layer["per_token"] * tokens + attention + exchange["saved"] for layer in layers]
    # bitsandbytes' parametrization dequantizes a whole fused expert tensor when it is read, and
    # the expert matmuls keep (views of) it for backward: one layer's experts in compute dtype.
    dequant = [layer["expert_compute_bytes"] if (q.load_in_4bit and q.quantize_experts) else 0 for layer in layers]
    expert_lora = [layer["expert_lora_transient_bytes"] for layer in layers]
    # Linear4bit dequantizes its weight transiently, one layer at a time.
    largest_linear = max((t.numel for t in tensors if t.is_linear_weight), default=0) * c if q.load_in_4bit else 0
    loss = loss_bytes(a, tokens, c, heads=2 if cfg.mtp.train else 1)
    offloaded = 0
    if cfg.memory.gradient_checkpointing:
        boundary = tokens * a.hidden * c
        boundaries = (len(layers) + 1) * boundary  # each layer's input, and the last layer's output
        if offload:
            # transformers' offload (save_on_cpu around each checkpointed layer) keeps every layer's input in
            # pinned host memory; on the GPU stay the last layer's output and the input of the layer recomputed.
            offloaded = (len(layers) - 1) * boundary
            boundaries -= offloaded
        # Recomputing one layer in backward: its activations, as much again in gradients, its experts.
        peak = max(2 * s + d + x for s, d, x in zip(saved, dequant, expert_lora)) + largest_linear
        peak += exchange["transient"]
        dequant_held = max(dequant, default=0)
    else:
        # Autograd keeps every layer's activations, and every MoE layer's dequantized experts.
        boundaries = 0
        peak = sum(saved) + max(saved, default=0) + sum(dequant) + max(expert_lora, default=0) + largest_linear
        peak += exchange["transient"]
        dequant_held = sum(dequant)
    return {
        "tokens_per_micro_batch": tokens,  # this process's: length / sequence_parallel of each row
        "sequence_parallel": size,
        "sequence_parallel_bytes": exchange["saved"] * 2 + exchange["transient"] if size > 1 else 0,
        "offloaded_activation_bytes": offloaded,
        "layer_boundaries_bytes": boundaries,
        "layer_peak_bytes": peak,
        "dequantized_experts_bytes": dequant_held,
        "expert_lora_transient_bytes": max(expert_lora, default=0),
        "attention_extra_bytes": attention,
        **loss,
        "activation_bytes": boundaries + peak + loss["logits_and_loss_bytes"],
    }
