"""Memory plan: will this QLoRA run fit on the GPUs, before a single weight is read?

The model is built on the meta device (shapes only, no storage) from `paths.model_dir`'s
config.json, or from GLM-4.5-Air's published architecture built into the kit when the
weights are not downloaded yet. Every tensor is then priced the way it will be held:

- 4-bit tensors exactly as bitsandbytes 0.50 stores them (`functional.quantize_4bit`):
  packed data, one absmax per block, and with double quantization the absmax as uint8
  plus its own fp32 absmax per 256 blocks, a 256-entry fp32 code and an fp32 offset;
- everything else in its dtype on the meta model (the compute dtype, fp32 where
  transformers keeps it so, e.g. the router's e_score_correction_bias);
- LoRA weights, gradients and both AdamW moments in fp32;
- activations under gradient checkpointing, the logits and the loss, and a fixed
  allowance for the CUDA context, NCCL buffers and allocator slack.

Run it as `train_qlora.py --config X --plan [--json]`, or `python -m glmkit.plan`.
All sizes are decimal GB (1e9 bytes), like GPU spec sheets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from glmkit.config import add_config_arguments, config_from_args
from glmkit.config import strategy as config_strategy
from glmkit.loss import chunk_tokens_for
from glmkit.model import BASE_GROUPS, DTYPES, group_of  # shared with the audit, so plan and audit compare

GB = 1e9
# QLoRA paper: NF4 with double quantization costs 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.
QLORA_BITS_PER_PARAM = 4.127
# CUDA context, cuBLAS workspaces, NCCL buffers and allocator fragmentation, per GPU.
RUNTIME_OVERHEAD_BYTES = int(3 * GB)
# Below this much headroom (share of the GPU) a run that fits is reported as tight.
TIGHT_HEADROOM = 0.10
# The plain transformers path: BitsAndBytesConfig has no block size; bitsandbytes defaults to 64.
PLAIN_BLOCKSIZE = 64
EXIT_DOES_NOT_FIT = 3

# zai-org/GLM-4.5-Air's published config.json (the keys transformers' Glm4MoeConfig reads).
# Its MTP layer (num_nextn_predict_layers: 1) is not built by transformers, so not planned.
GLM45_AIR_CONFIG = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 46,
    "first_k_dense_replace": 1,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "n_routed_experts": 128,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "attention_bias": True,
    "use_qk_norm": False,
    "partial_rotary_factor": 0.5,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338],
    "num_nextn_predict_layers": 1,
}
GLM45_AIR_NAME = "zai-org/GLM-4.5-Air"


class PlanError(RuntimeError):
    """The plan can't be made; the message (one line) says why and what to do."""


# ---------------------------------------------------------------------------
# Byte counts of one tensor
# ---------------------------------------------------------------------------

def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes bitsandbytes 0.50 holds for one 4-bit tensor of `numel` values (uint8 storage).

    Mirrors `functional.quantize_4bit`: packed data (n+1)//2 bytes, a fresh 16-entry fp32
    code, and per block an fp32 absmax, or with double quantization a uint8 absmax plus the
    nested state `quantize_blockwise(absmax - offset, blocksize=256)` leaves: fp32 absmax per
    256 blocks, its own copy of the 256-entry fp32 dynamic code, and the fp32 offset.
    """
    blocks = -(-numel // blocksize)
    total = (numel + 1) // 2 + 16 * 4
    if double_quant:
        total += blocks + (-(-blocks // 256)) * 4 + 256 * 4 + 4
    else:
        total += blocks * 4
    return total


def qlora_floor_bytes(numel: int) -> float:
    return numel * QLORA_BITS_PER_PARAM / 8


# ---------------------------------------------------------------------------
# Architecture: config.json when downloaded, GLM-4.5-Air's otherwise
# ---------------------------------------------------------------------------

def load_architecture(cfg):
    """(transformers config, "config.json" | "builtin")."""
    model_dir = cfg.paths.model_dir
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(model_dir, local_files_only=True), "config.json"
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PlanError(f"{model_dir}/config.json can't be read by transformers: {first}") from None
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**GLM45_AIR_CONFIG), "builtin"


def build_meta_model(hf_config, compute_dtype: str):
    """The model with shapes and dtypes but no storage: enough to price every tensor."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # from_config chatter is noise in a plan
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[compute_dtype])
    except (ValueError, KeyError) as exc:
        raise PlanError(f"transformers can't build a {getattr(hf_config, 'model_type', '?')!r} model: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------
# Tensors of the model, grouped like glmkit.model.audit_model
# ---------------------------------------------------------------------------

@dataclass
class TensorInfo:
    name: str
    group: str
    numel: int
    dtype_bytes: int
    layer: int | None       # decoder layer index, None outside the layers
    is_linear_weight: bool  # weight of an nn.Linear other than lm_head: 4-bit in both kit and plain path
    is_expert: bool         # a fused 3-D routed-expert parameter: 4-bit only in the kit


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def enumerate_tensors(model) -> list[TensorInfo]:
    """Every parameter, plus the persistent router buffer the audit counts."""
    linear_weights = {f"{name}.weight" for name, module in model.named_modules()
                      if isinstance(module, nn.Linear) and not name.endswith("lm_head")}
    tensors = []
    for name, param in model.named_parameters():
        is_expert = ".mlp.experts." in name and param.dim() == 3
        tensors.append(TensorInfo(name, group_of(name), param.numel(), param.element_size(),
                                  _layer_index(name), name in linear_weights, is_expert))
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            tensors.append(TensorInfo(name, group_of(name), buf.numel(), buf.element_size(),
                                      _layer_index(name), False, False))
    return tensors


def _kit_bytes(t: TensorInfo, q) -> int:
    """As glmkit.model.load_model holds it."""
    if q.load_in_4bit and (t.is_linear_weight or (t.is_expert and q.quantize_experts)):
        return nf4_bytes(t.numel, q.blocksize, q.double_quant)
    return t.numel * t.dtype_bytes


def _kit_quantized(t: TensorInfo, q) -> bool:
    return q.load_in_4bit and (t.is_linear_weight or (t.is_expert and q.quantize_experts))


def _plain_bytes(t: TensorInfo, q, upcast: bool) -> int:
    """As from_pretrained(quantization_config=BitsAndBytesConfig(...)) holds it: only nn.Linear
    goes 4-bit, the fused experts stay in the load dtype; `prepare_model_for_kbit_training`
    then casts every non-4-bit parameter to fp32 (upcast=True)."""
    if t.is_linear_weight:
        return nf4_bytes(t.numel, PLAIN_BLOCKSIZE, q.double_quant)
    return t.numel * (4 if upcast else t.dtype_bytes)


def _floor_bytes(t: TensorInfo) -> float:
    """The QLoRA ideal: 4.127 bits for everything the kit can quantize, bf16 for the rest."""
    if t.is_linear_weight or t.is_expert:
        return qlora_floor_bytes(t.numel)
    return t.numel * 2.0


def price_groups(tensors: list[TensorInfo], q) -> dict:
    groups = {g: {"params": 0, "quantized_params": 0, "bytes": 0, "plain_path_bytes": 0,
                  "plain_path_upcast_bytes": 0, "qlora_floor_bytes": 0} for g in BASE_GROUPS}
    for t in tensors:
        g = groups.setdefault(t.group, {k: 0 for k in groups["attention"]})
        g["params"] += t.numel
        g["quantized_params"] += t.numel if _kit_quantized(t, q) else 0
        g["bytes"] += _kit_bytes(t, q)
        g["plain_path_bytes"] += _plain_bytes(t, q, upcast=False)
        g["plain_path_upcast_bytes"] += _plain_bytes(t, q, upcast=True)
        g["qlora_floor_bytes"] += _floor_bytes(t)
    for g in groups.values():
        g["qlora_floor_bytes"] = int(round(g["qlora_floor_bytes"]))
    return groups


# ---------------------------------------------------------------------------
# LoRA: which modules and parameters PEFT will wrap, and how many weights that adds
# ---------------------------------------------------------------------------

@dataclass
class LoraTarget:
    name: str
    layer: int | None
    in_features: int
    params: int
    expert: bool = False    # a fused 3-D routed-expert parameter (glmkit.expert_lora), at lora.expert_r


def lora_targets(model, lora) -> list[LoraTarget]:
    """LoRA on a Linear adds r*(in+out); on a 3-D expert parameter [E, a, b], E*r*(a+b) at the expert rank."""
    from glmkit.lora import expert_rank, matches

    modules = list(lora.target_modules)
    all_linear = "all-linear" in modules
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if (all_linear and not name.endswith("lm_head")) or matches(name, modules):
            found.append(LoraTarget(name, _layer_index(name), module.in_features,
                                    lora.r * (module.in_features + module.out_features)))
    for name, param in model.named_parameters():
        if lora.target_parameters and matches(name, lora.target_parameters):
            shape = tuple(param.shape)
            experts, a, b = shape if len(shape) == 3 else (1, *shape)
            found.append(LoraTarget(name, _layer_index(name), b, experts * expert_rank(lora)[0] * (a + b),
                                    expert=True))
    return found


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


def loss_bytes(a: Arch, tokens: int, c: int) -> dict:
    """The chunked loss the trainer runs (glmkit/loss.py), and what the full-vocabulary one would hold.

    Chunked: the target tokens' hidden states and their gradient ([tokens, hidden] each),
    plus one chunk of logits at a time: compute-dtype logits, the fp32 copy and the
    log-softmax (forward) or softmax-minus-one-hot (backward). Full: [tokens, vocab]
    logits, the fp32 upcast and the shifted slice's reshaped copy in forward; in backward
    the saved log-softmax, the gradient it receives and the one it passes on, all fp32.
    """
    chunk = min(tokens, chunk_tokens_for(a.vocab))
    return {
        "loss_chunk_tokens": chunk,
        "logits_and_loss_bytes": 2 * tokens * a.hidden * c + chunk * a.vocab * (c + 8),
        "full_vocab_loss_bytes": tokens * a.vocab * max(c + 8, 12),
    }


def layer_breakdown(model, a: Arch, cfg, targets: list[LoraTarget]) -> list[dict]:
    """Per decoder layer: activations per token, and its expert bytes in compute dtype."""
    c = DTYPES[cfg.quantization.compute_dtype].itemsize
    lora_per_layer: dict[int, int] = defaultdict(int)
    for t in targets:
        if t.layer is not None and not t.expert:
            # lora_A's input (a dropout copy plus its mask when dropout > 0) and its r outputs.
            dropout = (c + 1) * t.in_features if cfg.lora.dropout > 0 else 0
            lora_per_layer[t.layer] += dropout + c * cfg.lora.r
    layers = []
    for index, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        moe = experts is not None
        expert_numel = sum(p.numel() for p in experts.parameters()) if moe else 0
        per_token = attention_per_token(a, c) + (moe_per_token(a, c) if moe else dense_mlp_per_token(a, c))
        expert_lora = expert_lora_activations(a, c, [t for t in targets if t.expert and t.layer == index], cfg.lora)
        layers.append({"index": index, "moe": moe,
                       "per_token": per_token + lora_per_layer[index] + expert_lora["per_token"],
                       "expert_compute_bytes": expert_numel * c,
                       "expert_lora_transient_bytes": expert_lora["transient"]})
    return layers


def expert_lora_activations(a: Arch, c: int, targets: list[LoraTarget], lora) -> dict:
    """What LoRA on one layer's fused experts adds on top of the experts' own activations.

    glmkit.expert_lora runs it factored per routed token: per (token, expert) pair it keeps the
    r-wide low-rank input of each B matmul and makes one projection-wide output per parameter
    (gate_up: 2 x moe_intermediate, down: hidden). Per layer, in backward, the factors exist
    once more in the compute dtype and so do their gradients before they reach the fp32 ones.
    Nothing the size of an expert tensor is made: no delta, no weight gradient.
    """
    if not targets:
        return {"per_token": 0, "transient": 0}
    from glmkit.lora import expert_rank

    r = expert_rank(lora)[0]
    widths = {"gate_up_proj": 2 * a.moe_inter, "down_proj": a.hidden}
    per_pair = sum(c * (r + widths.get(t.name.rpartition(".")[2], a.hidden)) for t in targets)
    factors = sum(t.params for t in targets) * c
    return {"per_token": a.top_k * per_pair, "transient": 2 * factors}


def activation_plan(model, a: Arch, cfg, targets: list[LoraTarget], tensors: list[TensorInfo],
                    micro_batch: int | None = None) -> dict:
    c = DTYPES[cfg.quantization.compute_dtype].itemsize
    q = cfg.quantization
    mb, seq = micro_batch or cfg.optimization.micro_batch_per_gpu, cfg.training.max_seq_length
    tokens = mb * seq
    layers = layer_breakdown(model, a, cfg, targets)
    attention = attention_extra_bytes(a, cfg.model.attn_implementation, mb, seq, c)
    saved = [layer["per_token"] * tokens + attention for layer in layers]
    # bitsandbytes' parametrization dequantizes a whole fused expert tensor when it is read, and
    # the expert matmuls keep (views of) it for backward: one layer's experts in compute dtype.
    dequant = [layer["expert_compute_bytes"] if (q.load_in_4bit and q.quantize_experts) else 0 for layer in layers]
    expert_lora = [layer["expert_lora_transient_bytes"] for layer in layers]
    # Linear4bit dequantizes its weight transiently, one layer at a time.
    largest_linear = max((t.numel for t in tensors if t.is_linear_weight), default=0) * c if q.load_in_4bit else 0
    loss = loss_bytes(a, tokens, c)
    if cfg.memory.gradient_checkpointing:
        boundaries = (len(layers) + 1) * tokens * a.hidden * c  # each layer's input, and the embeddings
        # Recomputing one layer in backward: its activations, as much again in gradients, its experts.
        peak = max(2 * s + d + x for s, d, x in zip(saved, dequant, expert_lora)) + largest_linear
        dequant_held = max(dequant, default=0)
    else:
        # Autograd keeps every layer's activations, and every MoE layer's dequantized experts.
        boundaries = 0
        peak = sum(saved) + max(saved, default=0) + sum(dequant) + max(expert_lora, default=0) + largest_linear
        dequant_held = sum(dequant)
    return {
        "tokens_per_micro_batch": tokens,
        "layer_boundaries_bytes": boundaries,
        "layer_peak_bytes": peak,
        "dequantized_experts_bytes": dequant_held,
        "expert_lora_transient_bytes": max(expert_lora, default=0),
        "attention_extra_bytes": attention,
        **loss,
        "activation_bytes": boundaries + peak + loss["logits_and_loss_bytes"],
    }


# ---------------------------------------------------------------------------
# Per GPU, for the chosen strategy
# ---------------------------------------------------------------------------

def detected_gpu_memory() -> tuple[int, str] | None:
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    smallest = min(props, key=lambda p: p.total_memory)
    return smallest.total_memory, f"detected ({smallest.name})"


def default_num_processes(cfg) -> int:
    if cfg.distributed.num_processes:
        return cfg.distributed.num_processes
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def per_gpu_plan(strategy: str, n: int, weights: int, largest_layer: int, lora: dict, act: dict) -> dict:
    """DDP: a full replica per GPU (plus its gradient buckets). FSDP / ZeRO-3: every state
    sharded n ways, plus one decoder layer gathered at a time."""
    sharded = strategy in ("fsdp", "deepspeed_zero3")
    div = n if sharded else 1
    parts = {
        "weights": weights // div,
        "gathered_layer": largest_layer if sharded and n > 1 else 0,
        "lora_weights": lora["lora_bytes"] // div,
        "lora_grads": lora["lora_grad_bytes"] // div,
        # DDP all-reduces through bucket buffers as large as the gradients.
        "ddp_grad_buckets": 0 if sharded else lora["lora_grad_bytes"],
        "optimizer": lora["optimizer_bytes"] // div,
        "activations": act["activation_bytes"],
        "runtime_overhead": RUNTIME_OVERHEAD_BYTES,
    }
    return parts


def largest_micro_batch(fits, limit: int = 4096) -> int:
    """The largest micro-batch m <= limit with fits(m) (0 when not even 1 fits); memory grows with m."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, 2 * high
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _largest_layer_bytes(tensors: list[TensorInfo], q) -> int:
    by_layer: dict[int, int] = defaultdict(int)
    for t in tensors:
        if t.layer is not None:
            by_layer[t.layer] += _kit_bytes(t, q)
    return max(by_layer.values(), default=0)


def build_plan(cfg, gpu_memory_bytes: int | None = None, num_processes: int | None = None) -> dict:
    """The whole plan as one JSON-ready dict; loads no weights."""
    q = cfg.quantization
    hf_config, source = load_architecture(cfg)
    model = build_meta_model(hf_config, q.compute_dtype)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise PlanError(f"{type(model).__name__} has no model.layers; the plan covers decoder-only models")
    tensors = enumerate_tensors(model)
    groups = price_groups(tensors, q)
    check_lora_targets(model, cfg.lora)
    targets = lora_targets(model, cfg.lora)
    a = arch_of(hf_config)
    act = activation_plan(model, a, cfg, targets, tensors)
    strategy = config_strategy(cfg)
    n = num_processes or default_num_processes(cfg)

    lora_params = sum(t.params for t in targets)
    lora = {"lora_params": lora_params, "lora_bytes": 4 * lora_params,
            "lora_grad_bytes": 4 * lora_params, "optimizer_bytes": 8 * lora_params}
    weights = sum(g["bytes"] for g in groups.values())
    parts = per_gpu_plan(strategy, n, weights, _largest_layer_bytes(tensors, q), lora, act)
    total = sum(parts.values())

    if gpu_memory_bytes is not None:
        gpu, gpu_source = int(gpu_memory_bytes), "given"
    else:
        gpu, gpu_source = detected_gpu_memory() or (int(cfg.distributed.gpu_memory_gb * GB),
                                                     "distributed.gpu_memory_gb")
    # Everything but the activations is independent of the micro-batch.
    max_micro_batch = largest_micro_batch(lambda mb: total - act["activation_bytes"] + activation_plan(
        model, a, cfg, targets, tensors, micro_batch=mb)["activation_bytes"] <= gpu)
    plain_upcast = sum(g["plain_path_upcast_bytes"] for g in groups.values())
    # Down the plain path the experts are resident already (nothing to dequantize), in fp32.
    plain_weights = plain_upcast if strategy == "ddp" else plain_upcast // n
    plain_total = total - parts["weights"] + plain_weights - act["dequantized_experts_bytes"]

    plan = {
        "model": cfg.model.name_or_path if source == "config.json" else GLM45_AIR_NAME,
        "model_dir": cfg.paths.model_dir,
        "source": source,
        "model_type": getattr(hf_config, "model_type", None),
        "strategy": strategy,
        "num_processes": n,
        "micro_batch_per_gpu": cfg.optimization.micro_batch_per_gpu,
        "max_seq_length": cfg.training.max_seq_length,
        "gradient_checkpointing": cfg.memory.gradient_checkpointing,
        "attn_implementation": cfg.model.attn_implementation,
        "quantization": {"load_in_4bit": q.load_in_4bit, "quant_type": q.quant_type,
                         "double_quant": q.double_quant, "blocksize": q.blocksize,
                         "quantize_experts": q.quantize_experts, "compute_dtype": q.compute_dtype},
        "params_total": sum(t.numel for t in tensors),
        "quantized_params": sum(g["quantized_params"] for g in groups.values()),
        "groups": groups,
        "weights_bytes": weights,
        "qlora_floor_bytes": sum(g["qlora_floor_bytes"] for g in groups.values()),
        "plain_path_weights_bytes": sum(g["plain_path_bytes"] for g in groups.values()),
        "plain_path_upcast_weights_bytes": plain_upcast,
        "lora_targets": len(targets),
        **lora,
        **expert_lora_summary(targets, cfg.lora),
        **act,
        "per_gpu": parts,
        "total_bytes_per_gpu": total,
        "plain_path_total_bytes_per_gpu": plain_total,
        "gpu_memory_bytes": gpu,
        "gpu_memory_source": gpu_source,
        "headroom_bytes": gpu - total,
        "fits": total <= gpu,
        "max_micro_batch_per_gpu": max_micro_batch,
        "plain_path_fits": plain_total <= gpu,
        "notes": _notes(cfg, source, strategy, n),
    }
    plan["verdict"] = verdict_line(plan)
    return plan


def check_lora_targets(model, lora) -> None:
    """The trainer's rule (glmkit.lora): every listed target must match, or there is no plan to make."""
    from glmkit.lora import LoraTargetError, resolve_targets

    try:
        resolve_targets(model, lora)
    except LoraTargetError as exc:
        raise PlanError(str(exc)) from None


def expert_lora_summary(targets: list[LoraTarget], lora) -> dict:
    """LoRA parameters by the group of the layer they adapt, and the routed experts' rank."""
    from glmkit.lora import expert_rank

    by_group = {"attention": 0, "routed_experts": 0, "shared_experts": 0}
    for t in targets:
        group = group_of(t.name + ".")
        by_group[group] = by_group.get(group, 0) + t.params
    return {"lora_params_by_group": by_group,
            "expert_lora_rank": expert_rank(lora)[0] if any(t.expert for t in targets) else None}


def _expert_lora_lines(plan: dict) -> list[str]:
    """Under the LoRA weights: how they split by group, when the routed experts are adapted."""
    by_group = plan.get("lora_params_by_group") or {}
    if not by_group.get("routed_experts"):
        return []
    share = by_group["routed_experts"] / max(plan["lora_params"], 1)
    return [f"      {'of which routed experts (rank ' + str(plan['expert_lora_rank']) + ')':<38}"
            f"{by_group['routed_experts']:>12,} params, {share:.0%}; weights+grads+AdamW "
            f"{_gb(16 * by_group['routed_experts'])}"]


def _notes(cfg, source: str, strategy: str, n: int) -> list[str]:
    notes = []
    if source == "builtin":
        notes.append(f"{cfg.paths.model_dir} has no config.json yet: planned with the GLM-4.5-Air "
                     f"architecture built into the kit (MTP layer not loaded by transformers, not counted)")
        if cfg.model.name_or_path.rstrip("/") != GLM45_AIR_NAME:
            notes.append(f"model.name_or_path is {cfg.model.name_or_path}, not {GLM45_AIR_NAME}: download it "
                         f"to plan its own architecture")
    if strategy != "ddp":
        notes.append(f"{strategy}: weights, LoRA states and optimizer sharded over {n} processes plus one "
                     f"gathered layer; untested in this kit, see docs/MEMORY_AND_SCALING.md")
        if n == 1:
            notes.append("sharding over 1 process saves nothing: set distributed.num_processes to the GPU count")
    notes.append(f"activations are an estimate; {RUNTIME_OVERHEAD_BYTES / GB:.0f} GB is set aside for the "
                 f"CUDA context, NCCL buffers and allocator slack")
    return notes


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def _gb(nbytes: float) -> str:
    if nbytes < 0.1 * GB:
        return f"{nbytes / 1e6:.2f} MB" if nbytes < 10e6 else f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes / GB:.2f} GB" if nbytes < 10 * GB else f"{nbytes / GB:.1f} GB"


def _advice(plan: dict) -> str:
    if not plan["gradient_checkpointing"]:
        return "turn on memory.gradient_checkpointing"
    if plan["micro_batch_per_gpu"] > 1:
        if plan["max_micro_batch_per_gpu"]:
            return f"lower optimization.micro_batch_per_gpu to {plan['max_micro_batch_per_gpu']}"
        return "lower optimization.micro_batch_per_gpu"
    if plan["strategy"] == "ddp" and plan["weights_bytes"] > 0.5 * plan["gpu_memory_bytes"]:
        return "shard the weights: distributed.accelerate_config: fsdp (docs/MEMORY_AND_SCALING.md)"
    return "lower training.max_seq_length"


def verdict_line(plan: dict) -> str:
    """One line: does it fit, how much per GPU, and what dominates."""
    total, gpu = plan["total_bytes_per_gpu"], plan["gpu_memory_bytes"]
    setup = (f"{plan['strategy']} x {plan['num_processes']}, micro batch {plan['micro_batch_per_gpu']} x "
             f"{plan['max_seq_length']} tokens; weights {_gb(plan['per_gpu']['weights'])}, "
             f"activations {_gb(plan['activation_bytes'])}")
    if not plan["fits"]:
        return (f"memory plan: DOES NOT FIT - needs {_gb(total)} per GPU, has {_gb(gpu)} ({setup}); "
                f"{_advice(plan)}")
    word = "FITS (tight)" if gpu - total < TIGHT_HEADROOM * gpu else "FITS"
    return (f"memory plan: {word} - {_gb(total)} of {_gb(gpu)} per GPU ({setup}); micro batches up to "
            f"{plan['max_micro_batch_per_gpu']} fit")


def format_plan(plan: dict) -> str:
    q = plan["quantization"]
    where = "built-in GLM-4.5-Air architecture" if plan["source"] == "builtin" else f"{plan['model_dir']}/config.json"
    lines = [
        f"Memory plan for {plan['model']} ({where})",
        f"  {plan['strategy']} over {plan['num_processes']} process(es); micro batch "
        f"{plan['micro_batch_per_gpu']} x {plan['max_seq_length']} tokens; gradient checkpointing "
        f"{'on' if plan['gradient_checkpointing'] else 'OFF'}; "
        + (f"{q['quant_type'].upper()}{' + double quant' if q['double_quant'] else ''}, blocksize "
           f"{q['blocksize']}, experts {'4-bit' if q['quantize_experts'] else q['compute_dtype']}"
           if q["load_in_4bit"] else f"no 4-bit, {q['compute_dtype']} weights"),
        "",
        f"  {'group':<16}{'params':>17}{'4-bit':>17}{'kit':>12}{'plain path':>13}{'+ fp32 upcast':>15}",
    ]
    for name, g in plan["groups"].items():
        if g["params"]:
            lines.append(f"  {name:<16}{g['params']:>17,}{g['quantized_params']:>17,}{_gb(g['bytes']):>12}"
                         f"{_gb(g['plain_path_bytes']):>13}{_gb(g['plain_path_upcast_bytes']):>15}")
    lines.append(f"  {'total':<16}{plan['params_total']:>17,}{plan['quantized_params']:>17,}"
                 f"{_gb(plan['weights_bytes']):>12}{_gb(plan['plain_path_weights_bytes']):>13}"
                 f"{_gb(plan['plain_path_upcast_weights_bytes']):>15}")
    lines.append(f"  QLoRA floor ({QLORA_BITS_PER_PARAM} bits per 4-bit param, bf16 rest): "
                 f"{_gb(plan['qlora_floor_bytes'])}")
    lines += ["", f"  per GPU ({plan['strategy']})"]
    labels = {
        "weights": "weights" + (" (full replica)" if plan["strategy"] == "ddp" else " (shard)"),
        "gathered_layer": "one gathered layer",
        "lora_weights": f"LoRA weights fp32 ({plan['lora_params']:,} params)",
        "lora_grads": "LoRA gradients fp32",
        "ddp_grad_buckets": "DDP gradient buckets",
        "optimizer": "AdamW moments fp32 (2 per param)",
        "activations": "activations",
        "runtime_overhead": "CUDA context, NCCL, allocator slack",
    }
    for key, value in plan["per_gpu"].items():
        if value or key in ("weights", "activations"):
            lines.append(f"    {labels[key]:<40}{_gb(value):>12}")
        if key == "lora_weights":
            lines += _expert_lora_lines(plan)
        if key == "activations":
            lines += [
                f"      {'layer inputs kept by checkpointing':<38}{_gb(plan['layer_boundaries_bytes']):>12}",
                f"      {'one layer recomputed + its gradients':<38}{_gb(plan['layer_peak_bytes']):>12}",
                f"      {'  of which dequantized experts':<38}{_gb(plan['dequantized_experts_bytes']):>12}",
                *([f"      {'  of which expert LoRA factors':<38}{_gb(plan['expert_lora_transient_bytes']):>12}"]
                  if plan.get("expert_lora_transient_bytes") else []),
                f"      {'attention beyond q, k, v, output':<38}{_gb(plan['attention_extra_bytes']):>12}"
                f"   ({plan['attn_implementation']})",
                f"      {'lm_head + loss, chunked':<38}{_gb(plan['logits_and_loss_bytes']):>12}"
                f"   ({plan['loss_chunk_tokens']} tokens a chunk; full-vocabulary logits would hold "
                f"{_gb(plan['full_vocab_loss_bytes'])})",
            ]
    lines.append(f"    {'total':<40}{_gb(plan['total_bytes_per_gpu']):>12}   of {_gb(plan['gpu_memory_bytes'])} "
                 f"({plan['gpu_memory_source']})")
    lines.append(f"  largest micro_batch_per_gpu that fits at {plan['max_seq_length']} tokens: "
                 f"{plan['max_micro_batch_per_gpu']} (this config: {plan['micro_batch_per_gpu']})")
    lines += [
        "",
        f"  Plain transformers path (BitsAndBytesConfig leaves the fused experts in {q['compute_dtype']}, then "
        f"prepare_model_for_kbit_training upcasts them to fp32):",
        f"    weights {_gb(plan['plain_path_weights_bytes'])}, after the upcast "
        f"{_gb(plan['plain_path_upcast_weights_bytes'])}; per GPU about "
        f"{_gb(plan['plain_path_total_bytes_per_gpu'])}: {'fits' if plan['plain_path_fits'] else 'does not fit'}",
        "",
    ]
    lines += [f"  note: {note}" for note in plan["notes"]]
    lines += ["", plan["verdict"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The trainer's gate: refuse a run the plan says won't fit, before any weight is read
# ---------------------------------------------------------------------------

class DoesNotFit(RuntimeError):
    pass


def memory_gate(cfg, accelerator, force: bool) -> dict:
    """The plan's per-GPU numbers for run_start; on GPUs, refuse a run it says won't fit unless --force.

    The check runs before any weight is loaded, so a hopeless configuration costs seconds, not
    the minutes of streaming 100B parameters in before an out-of-memory error.
    """
    try:
        plan = build_plan(cfg, num_processes=accelerator.num_processes)
    except Exception as exc:  # a plan that cannot be built is reported, never a reason not to train
        return {"planned_memory_error": f"{type(exc).__name__}: {exc}"}
    if accelerator.device.type == "cuda":
        accelerator.print(verdict_line(plan))
        if not plan["fits"] and not force:
            raise DoesNotFit(f"{verdict_line(plan)}; pass --force to start anyway")
    return {"planned_memory": {k: plan.get(k) for k in ("total_bytes_per_gpu", "weights_bytes", "fits", "strategy")}}


def run_plan_cli(cfg, as_json: bool) -> int:
    """Print the plan (a table and the verdict, or one JSON object); 0, or 1 if it can't be made."""
    try:
        plan = build_plan(cfg)
    except PlanError as exc:
        print(f"plan error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(plan, indent=2) if as_json else format_plan(plan))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmkit.plan", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--check", action="store_true",
                        help=f"print only the verdict line; exit {EXIT_DOES_NOT_FIT} when the run does not fit")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="processes in the whole run (default: distributed.num_processes or the visible GPUs)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if not args.check:
        if args.num_processes:
            cfg.distributed.num_processes = args.num_processes
        return run_plan_cli(cfg, args.json)
    try:
        plan = build_plan(cfg, num_processes=args.num_processes)
    except PlanError as exc:
        print(f"plan error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(plan) if args.json else plan["verdict"])
    return 0 if plan["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
