"""Memory plan: will this QLoRA run fit on the GPUs, before a single weight is read?

The model is built on the meta device (shapes only, no storage) from `paths.model_dir`'s
config.json, or from the published architecture built into the kit (GLM-4.5-Air, GLM-4.5,
GLM-4.6, GLM-4.7, chosen by model.name_or_path) when the weights are not downloaded yet. Every tensor, the MTP
layer's included, is then priced the way it will be held:

- 4-bit tensors exactly as bitsandbytes 0.50 stores them (`functional.quantize_4bit`):
  packed data, one absmax per block, and with double quantization the absmax as uint8
  plus its own fp32 absmax per 256 blocks, a 256-entry fp32 code and an fp32 offset;
- everything else in its dtype on the meta model (the compute dtype, fp32 where
  transformers keeps it so, e.g. the router's e_score_correction_bias);
- LoRA weights, gradients and both AdamW moments in fp32;
- activations under gradient checkpointing, the logits and the loss, and a fixed
  allowance for the CUDA context, NCCL buffers and allocator slack.

The tensors are priced in glmkit/plan/weights.py, the activations in glmkit/plan/activations.py;
this module sums them per GPU for the chosen strategy, sizes the micro-batch, prints the verdict
and gates the trainer. Run it as `train_qlora.py --config X --plan [--json]`, or `python -m glmkit.plan`.
All sizes are decimal GB (1e9 bytes), like GPU spec sheets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

from glmkit.config.cli import add_config_arguments, config_from_args
from glmkit.config.strategy import strategy as config_strategy
from glmkit.model.load import group_of
from glmkit.model.sequence_parallel import check_heads, sizes_that_split
from glmkit.plan.activations import activation_plan, arch_of
from glmkit.plan.weights import (
    BUILTIN_ARCHITECTURES,
    GB,
    QLORA_BITS_PER_PARAM,
    LoraTarget,
    PlanError,
    TensorInfo,
    build_meta_model,
    builtin_name,
    enumerate_tensors,
    kit_bytes,
    load_architecture,
    lora_targets,
    price_groups,
    replicated_bytes,
)
from glmkit.run.host_memory import available_bytes

# CUDA context, cuBLAS workspaces, NCCL buffers and allocator fragmentation, per GPU.
RUNTIME_OVERHEAD_BYTES = int(3 * GB)
# Below this much headroom (share of the GPU) a run that fits is reported as tight.
TIGHT_HEADROOM = 0.10
EXIT_DOES_NOT_FIT = 3

# ---------------------------------------------------------------------------
# Per GPU, for the chosen strategy
# ---------------------------------------------------------------------------

def detected_gpu_memory() -> tuple[int, str] | None:
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    smallest = min(props, key=lambda p: p.total_memory)
    return smallest.total_memory, f"detected ({smallest.name})"


# The node the shipped recipe is written for (4 x H200). Where no GPU is visible and distributed.num_processes is
# null (a laptop, a login node: where people plan before renting), the plan is made for this many GPUs of
# distributed.gpu_memory_gb, and says so.
RECIPE_NODE_GPUS = 4


def planned_processes(cfg) -> tuple[int, bool]:
    """(processes to plan for, assumed): the configured count, else the visible GPUs, else the recipe's node."""
    if cfg.distributed.num_processes:
        return cfg.distributed.num_processes, False
    if torch.cuda.is_available() and torch.cuda.device_count():
        return torch.cuda.device_count(), False
    return RECIPE_NODE_GPUS, True


# FSDP2 gathers the layer it computes and prefetches the next one (backward), so two are whole at a time.
GATHERED_LAYERS = 2


def per_gpu_plan(strategy: str, n: int, weights: int, largest_layer: int, lora: dict, act: dict,
                 replicated: int = 0) -> dict:
    """DDP: a full replica per GPU (plus its gradient buckets). FSDP: every parameter and state sharded n ways
    (the 4-bit statistics, `replicated`, stay whole), plus the gathered layers."""
    sharded = strategy == "fsdp"
    div = n if sharded else 1
    parts = {
        "weights": (weights - replicated) // div + replicated if sharded else weights,
        "gathered_layer": GATHERED_LAYERS * largest_layer if sharded and n > 1 else 0,
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
            by_layer[t.layer] += kit_bytes(t, q)
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
    check_lora_targets(model, cfg.lora, cfg.mtp.train)
    targets = lora_targets(model, cfg.lora, cfg.mtp.train)
    a = arch_of(hf_config)
    strategy = config_strategy(cfg)
    n, assumed = (num_processes, False) if num_processes else planned_processes(cfg)
    check_sequence_parallel(cfg, a, n)
    act = activation_plan(model, a, cfg, targets, tensors)

    lora_params = sum(t.params for t in targets)
    lora = {"lora_params": lora_params, "lora_bytes": 4 * lora_params,
            "lora_grad_bytes": 4 * lora_params, "optimizer_bytes": 8 * lora_params}
    weights = sum(g["bytes"] for g in groups.values())
    parts = per_gpu_plan(strategy, n, weights, _largest_layer_bytes(tensors, q), lora, act,
                         replicated=sum(replicated_bytes(t, q) for t in tensors))
    total = sum(parts.values())

    if gpu_memory_bytes is not None:
        gpu, gpu_source = int(gpu_memory_bytes), "given"
    else:
        gpu, gpu_source = detected_gpu_memory() or (int(cfg.distributed.gpu_memory_gb * GB),
                                                     "distributed.gpu_memory_gb")
    # Everything but the activations is independent of the micro-batch and of sequence parallelism.
    def total_with(**change) -> int:
        return total - act["activation_bytes"] + activation_plan(model, a, cfg, targets, tensors,
                                                                 **change)["activation_bytes"]

    def total_for(strategy_: str, n_: int, micro_batch: int, config=cfg) -> int:
        """Bytes per GPU with another strategy, process count, micro-batch or config (the advice's what-ifs)."""
        activations = activation_plan(model, a, config, targets, tensors, micro_batch=micro_batch)
        return sum(per_gpu_plan(strategy_, n_, weights, _largest_layer_bytes(tensors, q), lora, activations,
                                replicated=sum(replicated_bytes(t, q) for t in tensors)).values())

    max_micro_batch = largest_micro_batch(lambda mb: total_with(micro_batch=mb) <= gpu)
    long_rows = sequence_parallel_options(cfg, a, n, total_with, gpu)
    plain_upcast = sum(g["plain_path_upcast_bytes"] for g in groups.values())
    # Down the plain path the experts are resident already (nothing to dequantize), in fp32.
    plain_weights = plain_upcast if strategy == "ddp" else plain_upcast // n
    plain_total = total - parts["weights"] + plain_weights - act["dequantized_experts_bytes"]

    plan = {
        "model": cfg.model.name_or_path if source == "config.json" else builtin_name(cfg.model.name_or_path),
        "model_dir": cfg.paths.model_dir,
        "source": source,
        "model_type": getattr(hf_config, "model_type", None),
        "strategy": strategy,
        "num_processes": n,
        "num_processes_assumed": assumed,
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
        "offload_activations": cfg.memory.offload_activations,
        "sequence_parallel_options": long_rows,
        "plain_path_fits": plain_total <= gpu,
        "notes": _notes(cfg, source, strategy, n, assumed) + _mtp_notes(cfg, groups),
    }
    plan["advice"] = None if plan["fits"] else fitting_change(cfg, plan, total_for, weights, gpu)
    plan["verdict"] = verdict_line(plan)
    return plan


def check_sequence_parallel(cfg, a, n: int) -> None:
    """The trainer's rules (glmkit/model/load.py, glmkit/train/sequence_parallel.py), as plan errors."""
    size = cfg.distributed.sequence_parallel
    problem = check_heads(a.heads, a.kv_heads, size)
    if problem:
        raise PlanError(f"distributed.sequence_parallel: {size}: {problem}")
    if n % size:
        raise PlanError(f"distributed.sequence_parallel: {size} does not divide the {n} processes planned for; "
                        f"set distributed.num_processes (or --num_processes) to a multiple of it")


def sequence_parallel_options(cfg, a, n: int, total_with, gpu: int) -> list[dict]:
    """Per GPU at every sequence_parallel this launch allows (it divides the processes and the heads), with
    activation offload as configured and, on top, with it turned on: which P makes this row length fit."""
    sizes = sizes_that_split(a.heads, a.kv_heads, n)
    offloads = [cfg.memory.offload_activations]
    if not cfg.memory.offload_activations and cfg.memory.gradient_checkpointing:
        offloads.append(True)
    options = []
    for offload in offloads:
        for size in sizes:
            total = total_with(sequence_parallel=size, offload=offload)
            options.append({"sequence_parallel": size, "offload_activations": offload,
                            "tokens_per_gpu": cfg.optimization.micro_batch_per_gpu * cfg.training.max_seq_length // size,
                            "total_bytes_per_gpu": total, "fits": total <= gpu})
    return options


def smallest_fitting(plan: dict) -> dict | None:
    """The option that fits with the fewest processes per row, without offload if that fits too."""
    fitting = [o for o in plan.get("sequence_parallel_options", []) if o["fits"]]
    return min(fitting, key=lambda o: (o["offload_activations"], o["sequence_parallel"]), default=None)


def check_lora_targets(model, lora, train_mtp: bool = False) -> None:
    """The trainer's rule (glmkit.model.lora): every listed target must match, or there is no plan to make."""
    from glmkit.model.errors import LoraTargetError
    from glmkit.model.lora import resolve_targets

    try:
        resolve_targets(model, lora, train_mtp)
    except LoraTargetError as exc:
        raise PlanError(str(exc)) from None


def expert_lora_summary(targets: list[LoraTarget], lora) -> dict:
    """LoRA parameters by the group of the layer they adapt, and the routed experts' rank."""
    from glmkit.model.lora import expert_rank

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


def _mtp_notes(cfg, groups: dict) -> list[str]:
    """What the MTP layer costs: its 4-bit weights always (it is measured at every eval), more with mtp.train."""
    mtp = groups.get("mtp", {})
    if not mtp.get("params"):
        return []
    trained = ("mtp.train: its LoRA, gradients and AdamW state, and one more layer's activations and lm_head pass "
               "per micro-step are counted" if cfg.mtp.train else
               "mtp.train is off: measured at every eval (speculative acceptance), not trained")
    return [f"the MTP layer ({mtp['params']:,} params) is loaded like a decoder layer: {_gb(mtp['bytes'])}; "
            f"{trained}"]


def _notes(cfg, source: str, strategy: str, n: int, assumed: bool = False) -> list[str]:
    notes = []
    if assumed:
        notes.append(f"no GPU is visible here and distributed.num_processes is null: planned for the recipe's node, "
                     f"{n} GPUs of distributed.gpu_memory_gb ({cfg.distributed.gpu_memory_gb:g} GB); set "
                     f"distributed.num_processes to plan for another count")
    if source == "builtin":
        notes.append(f"{cfg.paths.model_dir} has no config.json yet: planned with the "
                     f"{builtin_name(cfg.model.name_or_path)} architecture built into the kit")
        if cfg.model.name_or_path.rstrip("/") not in BUILTIN_ARCHITECTURES:
            notes.append(f"model.name_or_path is {cfg.model.name_or_path}, not one of "
                         f"{', '.join(BUILTIN_ARCHITECTURES)}: download it to plan its own architecture")
    if strategy == "fsdp":
        notes.append(f"fsdp: the packed 4-bit data, LoRA weights, gradients and AdamW state sharded over {n} "
                     f"processes (4-bit statistics whole on each), {GATHERED_LAYERS} decoder layers gathered at a "
                     f"time; see docs/SCALING.md")
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


# Process counts the advice tries when sharding over more GPUs would make a run fit (whole nodes of 8 beyond one).
MORE_PROCESSES = (2, 4, 8, 16, 24, 32, 48, 64)


def fitting_change(cfg, plan: dict, total_for, weights: int, gpu: int) -> str:
    """The first change that makes a run that does not fit, fit: each one checked against the same arithmetic,
    so the advice never names a change that would not fit either."""
    import dataclasses

    strategy, n, micro = plan["strategy"], plan["num_processes"], plan["micro_batch_per_gpu"]
    def fits(*args, **kw) -> bool:
        return total_for(*args, **kw) <= gpu
    if not cfg.memory.gradient_checkpointing:
        checkpointed = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, gradient_checkpointing=True))
        if fits(strategy, n, micro, config=checkpointed):
            return "turn on memory.gradient_checkpointing"
    if micro > 1 and plan["max_micro_batch_per_gpu"]:
        return f"lower optimization.micro_batch_per_gpu to {plan['max_micro_batch_per_gpu']}"
    option = smallest_fitting(plan)  # long rows: the fewest processes per row that fit (sequence parallelism)
    if option:
        change = []
        if option["sequence_parallel"] != plan["sequence_parallel"]:
            change.append(f"distributed.sequence_parallel: {option['sequence_parallel']}")
        if option["offload_activations"] and not plan["offload_activations"]:
            change.append("memory.offload_activations: true")
        if change:
            return (f"set {' and '.join(change)} ({_gb(option['total_bytes_per_gpu'])} per GPU, "
                    f"{option['tokens_per_gpu']:,} tokens each; docs/LONG_CONTEXT.md)")
    if strategy == "ddp" and n > 1 and fits("fsdp", n, 1):
        largest = largest_micro_batch(lambda mb: fits("fsdp", n, mb), limit=micro)
        what = ("the 4-bit weights alone ({}) do not fit one GPU: shard them".format(_gb(weights))
                if weights + RUNTIME_OVERHEAD_BYTES >= gpu else "shard the weights")
        smaller = f" and lower optimization.micro_batch_per_gpu to {largest}" if largest < micro else ""
        return f"{what} with distributed.accelerate_config: fsdp{smaller} (docs/SCALING.md)"
    for more in (m for m in MORE_PROCESSES if m > n):
        if fits("fsdp", more, 1):
            largest = largest_micro_batch(lambda mb, more=more: fits("fsdp", more, mb), limit=micro)
            smaller = f", micro_batch_per_gpu {largest}" if largest < micro else ""
            return (f"shard over {more} GPUs: distributed.accelerate_config: fsdp, distributed.num_processes "
                    f"{more}{smaller} (several nodes: docs/SCALING.md)")
    length = cfg.training.max_seq_length
    while length > 512:
        length //= 2
        shorter = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_seq_length=length))
        if fits(strategy, n, 1, config=shorter):
            return f"lower training.max_seq_length to {length} (with optimization.micro_batch_per_gpu 1)"
    return (f"no setting the plan knows makes it fit GPUs of {_gb(gpu)}: use GPUs with more memory "
            f"(distributed.gpu_memory_gb) or a smaller model")


def verdict_line(plan: dict) -> str:
    """One line: does it fit, how much per GPU, and what dominates."""
    total, gpu = plan["total_bytes_per_gpu"], plan["gpu_memory_bytes"]
    assumed = " assumed: no GPU here;" if plan.get("num_processes_assumed") else ","
    setup = (f"{plan['strategy']} x {plan['num_processes']}{assumed} micro batch {plan['micro_batch_per_gpu']} x "
             f"{plan['max_seq_length']} tokens{_shared_rows(plan)}; weights {_gb(plan['per_gpu']['weights'])}, "
             f"activations {_gb(plan['activation_bytes'])}")
    if not plan["fits"]:
        return f"memory plan: DOES NOT FIT - needs {_gb(total)} per GPU, has {_gb(gpu)} ({setup}); {plan['advice']}"
    word = "FITS (tight)" if gpu - total < TIGHT_HEADROOM * gpu else "FITS"
    return (f"memory plan: {word} - {_gb(total)} of {_gb(gpu)} per GPU ({setup}); micro batches up to "
            f"{plan['max_micro_batch_per_gpu']} fit")


def _shared_rows(plan: dict) -> str:
    if plan["sequence_parallel"] == 1:
        return ""
    return f" shared by {plan['sequence_parallel']} GPUs ({plan['tokens_per_micro_batch']:,} each)"


def _long_row_lines(plan: dict) -> list[str]:
    """Per GPU at each sequence_parallel (and with activation offload), when a row is longer than one GPU holds
    or the config already splits rows."""
    options = plan["sequence_parallel_options"]
    if plan["sequence_parallel"] == 1 and plan["fits"] or len(options) < 2:
        return []
    lines = ["", f"  {'sequence_parallel':<20}{'offload':<10}{'tokens per GPU':>16}{'per GPU':>12}"]
    for option in options:
        mark = "   <- this config" if (option["sequence_parallel"], option["offload_activations"]) == (
            plan["sequence_parallel"], plan["offload_activations"]) else ""
        lines.append((f"  {option['sequence_parallel']:<20}{'on' if option['offload_activations'] else 'off':<10}"
                      f"{option['tokens_per_gpu']:>16,}{_gb(option['total_bytes_per_gpu']):>12}"
                      f"{'  fits' if option['fits'] else '':<6}{mark}").rstrip())
    return lines


def format_plan(plan: dict) -> str:
    q = plan["quantization"]
    where = f"built-in {plan['model'].split('/')[-1]} architecture" if plan["source"] == "builtin" else f"{plan['model_dir']}/config.json"
    lines = [
        f"Memory plan for {plan['model']} ({where})",
        f"  {plan['strategy']} over {plan['num_processes']} process(es); micro batch "
        f"{plan['micro_batch_per_gpu']} x {plan['max_seq_length']} tokens{_shared_rows(plan)}; gradient checkpointing "
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
        "gathered_layer": f"{GATHERED_LAYERS} gathered layers (compute + prefetch)",
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
                f"      {'layer inputs kept by checkpointing':<38}{_gb(plan['layer_boundaries_bytes']):>12}"
                + (f"   (+ {_gb(plan['offloaded_activation_bytes'])} in pinned host memory: offload_activations)"
                   if plan["offloaded_activation_bytes"] else ""),
                f"      {'one layer recomputed + its gradients':<38}{_gb(plan['layer_peak_bytes']):>12}",
                f"      {'  of which dequantized experts':<38}{_gb(plan['dequantized_experts_bytes']):>12}",
                *([f"      {'  of which expert LoRA factors':<38}{_gb(plan['expert_lora_transient_bytes']):>12}"]
                  if plan.get("expert_lora_transient_bytes") else []),
                *([f"      {'  of which sequence-parallel exchange':<38}{_gb(plan['sequence_parallel_bytes']):>12}"
                   f"   (the attention output twice, the slice's q, k, v, send + receive buffers)"]
                  if plan["sequence_parallel_bytes"] else []),
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
    lines += _long_row_lines(plan)
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
    the minutes of streaming 100B parameters in before an out-of-memory error. A model folder without a
    config.json is not priced (the plan would price the built-in model): the model check after says what to do.
    """
    if not os.path.isfile(os.path.join(cfg.paths.model_dir, "config.json")):
        return {}
    try:
        plan = build_plan(cfg, num_processes=accelerator.num_processes)
    except Exception as exc:  # a plan that cannot be built is reported, never a reason not to train
        return {"planned_memory_error": f"{type(exc).__name__}: {exc}"}
    if accelerator.device.type == "cuda":
        accelerator.print(verdict_line(plan))
        if not plan["fits"] and not force:
            raise DoesNotFit(f"{verdict_line(plan)}; pass --force to start anyway")
    else:  # on CPU the processes share the host's memory: the same plan against what the host has left
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        refusal = None if force else host_memory_refusal(plan, local, available_bytes())
        flag = torch.tensor([1 if refusal else 0], device=accelerator.device)
        if accelerator.reduce(flag, "max").item():  # every process stops together, whatever it read
            raise DoesNotFit(refusal or "memory plan: another process of this run found that it does not fit "
                                        "in host memory (its line says why); pass --force to start anyway")
    return {"planned_memory": {k: plan.get(k) for k in ("total_bytes_per_gpu", "weights_bytes", "fits", "strategy")}}


def host_memory_refusal(plan: dict, processes: int, available: int | None) -> str | None:
    """The one line refusing a CPU run whose `processes` on this machine need more memory than it has left
    (MemAvailable), each priced like one GPU of the plan but with no CUDA context; None when it fits."""
    each = plan["total_bytes_per_gpu"] - RUNTIME_OVERHEAD_BYTES
    if available is None or processes * each <= available:
        return None
    weights = plan["per_gpu"]["weights"]
    advice = (f"the model's weights alone take {_gb(weights)} per process: train a smaller model (paths.model_dir "
              f"{plan['model_dir']}) or use a machine with more memory" if processes * weights > available else
              "lower optimization.micro_batch_per_gpu or training.max_seq_length")
    return (f"memory plan: DOES NOT FIT in host memory - {processes} process(es) x {_gb(each)} = "
            f"{_gb(processes * each)}, {_gb(available)} available (weights {_gb(weights)}, activations "
            f"{_gb(plan['activation_bytes'])} per process); {advice}; pass --force to start anyway")


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
