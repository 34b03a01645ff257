"""Activation memory of one micro-batch: per layer under gradient checkpointing, attention and loss per implementation.

Part of the memory plan (glmkit/plan/fit.py). A layer's terms are the tensors autograd keeps for backward,
counted the way the kit's model saves them in bf16 (tests/test_glm47_flash.py measures one layer's attention,
each kind, on the tiny models with saved-tensor hooks and holds the formula to it):
grouped-query attention (GLM-4.5-Air) and multi-head latent attention (GLM-4.7-Flash) differ in their
projections and head dims, and LoRA adds, per adapted Linear, the fp32 copy of its input peft makes for
its fp32 weights.
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
    head_dim: int             # q/k head dim (GQA: also v's)
    vocab: int
    experts: int
    top_k: int
    moe_inter: int
    shared_inter: int
    dense_inter: int
    v_head_dim: int = 0       # 0: head_dim
    q_lora_rank: int = 0      # multi-head latent attention (MLA): the query latent's width (0: no query latent)
    kv_lora_rank: int = 0     # MLA: the key/value latent's width; 0 for grouped-query attention
    qk_nope_head_dim: int = 0  # MLA: the part of q/k without rotary, expanded from the latent beside v

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim


def arch_of(hf_config) -> Arch:
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    moe_inter = getattr(hf_config, "moe_intermediate_size", 0) or 0
    kv_lora_rank = getattr(hf_config, "kv_lora_rank", None) or 0
    if kv_lora_rank:  # MLA: transformers maps head_dim to qk_rope_head_dim there; q/k carry nope + rope
        head_dim = hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim
        v_head_dim = hf_config.v_head_dim
    else:
        head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
        v_head_dim = head_dim
    return Arch(
        hidden=hidden,
        heads=heads,
        kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=hf_config.vocab_size,
        experts=getattr(hf_config, "n_routed_experts", None) or getattr(hf_config, "num_local_experts", 0) or 0,
        top_k=getattr(hf_config, "num_experts_per_tok", 0) or 0,
        moe_inter=moe_inter,
        shared_inter=moe_inter * (getattr(hf_config, "n_shared_experts", 0) or 0),
        dense_inter=getattr(hf_config, "intermediate_size", 0) or 0,
        v_head_dim=v_head_dim,
        q_lora_rank=(getattr(hf_config, "q_lora_rank", None) or 0) if kv_lora_rank else 0,
        kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=hf_config.qk_nope_head_dim if kv_lora_rank else 0,
    )


def _norm_per_token(a: Arch, c: int) -> int:
    return (4 + c) * a.hidden  # RMSNorm saves its fp32 upcast input and its output


def _upcast(width: int, c: int) -> int:
    """What an RMSNorm keeps of a `width`-wide input: its fp32 copy (the input itself when that is fp32 already)."""
    return 4 * width if c < 4 else 0


def attention_per_token(a: Arch, c: int) -> int:
    """One layer's attention, per token, without LoRA (lora_per_token): the input norm's fp32 copy, the latents'
    (MLA), then what a fused kernel (varlen, flash) keeps: q, k, v, its output and its log-sum-exp.

    Grouped-query: q and the output at heads x head_dim, k and v at kv_heads x head_dim. MLA: every head has
    its own k and v, expanded from the latent by kv_b_proj; q/k at the q/k head dim (nope + rope: 256 for
    GLM-4.7-Flash, not the 64 transformers calls head_dim), v and the output at v_head_dim, and the norms of
    the query and key/value latents keep their fp32 inputs. The flash kernel takes one head dim for all three,
    so a v head dim other than q/k's is padded to the wider one there (glmkit/model/attention.py)."""
    if a.mla:
        latents = 4 * (a.q_lora_rank + a.kv_lora_rank)  # the latent norms' fp32 inputs
        kernel = c * a.heads * 4 * max(a.head_dim, a.v_dim)  # q, k, v, output; the narrower padded to the wider
    else:
        latents = 0
        kernel = c * (2 * a.heads * a.head_dim + 2 * a.kv_heads * a.head_dim)
    return _upcast(a.hidden, c) + latents + kernel + 4 * a.heads  # + the log-sum-exp, fp32 per head


def lora_per_token(in_features: int, lora, c: int) -> int:
    """What one LoRA adapter on a Linear keeps per token: peft runs it in its fp32 weights' dtype, so lora_A keeps
    an fp32 copy of the input (the input itself when it is fp32 and undropped), dropout its 1-byte mask, and
    lora_B its r fp32 inputs."""
    dropout = lora.dropout > 0
    return (4 * in_features if (c < 4 or dropout) else 0) + (in_features if dropout else 0) + 4 * lora.r


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
        if a.mla:
            # sdpa takes v's own head dim (no padding) and keeps v as a view of kv_b_proj's whole [k_nope; v]
            # output: q, k at the q/k head dim, that output, and its own at v_head_dim, against the padded kernel's
            unpadded = 2 * a.head_dim + (a.qk_nope_head_dim + a.v_dim) + a.v_dim
            return mask + micro_batch * seq * c * a.heads * (unpadded - 4 * max(a.head_dim, a.v_dim))
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
            lora_per_layer[t.layer] += lora_per_token(t.in_features, cfg.lora, c)
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
