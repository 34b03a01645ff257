"""The rules between keys: declared bounds, then contradictions and choices that depend on this machine.

Each problem is one line that names the dotted key and the fix; glmkit/config/load.py collects them all.
Validation looks only at the paths' shapes (glmkit/config/folders.py checks that commands can write them).
"""

from __future__ import annotations

import difflib
import os

import yaml

from glmkit.config.keys import section_names
from glmkit.config.parse import bound_problems
from glmkit.config.schema import EVAL_SET_NAME, HELD_OUT_SET, MAX_SOURCE_WEIGHT, TRACKERS, Config
from glmkit.config.strategy import ACCELERATE_CONFIGS, REMOVED_STRATEGIES


def _contains(outer: str, inner: str) -> bool:
    """True if `inner` is `outer` or lies inside it (paths are already absolute and normalised)."""
    outer, inner = os.path.realpath(outer), os.path.realpath(inner)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def validate(cfg: Config) -> list[str]:
    problems: list[str] = []
    for name in section_names():
        problems.extend(bound_problems(getattr(cfg, name), name))

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    lo, q, lg, ck = cfg.lora, cfg.quantization, cfg.logging, cfg.checkpoint
    need(cfg.model.attn_implementation != "flash_attention_2" or flash_attn_importable(),
         "model.attn_implementation", "flash_attention_2 needs the flash-attn package, which does not import "
         "here; use varlen (torch's own flash-attention varlen kernel, nothing to install)")
    need(bool(lo.target_modules or lo.target_parameters), "lora.target_modules",
         "LoRA needs at least one target; list modules such as attention (every attention projection) or "
         "o_proj")
    # peft's LoRA on a 3-D parameter adds B_e A_e to the weight, which has no place for dropout on the
    # input; an adapter saved with dropout > 0 and target_parameters can't even be loaded by PeftModel.
    need(not lo.target_parameters or lo.dropout == 0, "lora.dropout",
         f"must be 0 when lora.target_parameters is set (LoRA on the fused expert parameters has no dropout), "
         f"got {lo.dropout}")
    need(not q.quantize_experts or q.load_in_4bit, "quantization.quantize_experts",
         "needs quantization.load_in_4bit: true (or set quantize_experts: false)")
    problems.extend(tracker_name_problems(lg.report_to))
    need(lg.eval_interval < 1 or ck.interval % lg.eval_interval == 0, "checkpoint.interval",
         f"must be a multiple of logging.eval_interval ({lg.eval_interval}) so every checkpoint has a "
         f"val loss to rank it by, got {ck.interval}")
    problems.extend(eval_problems(cfg))
    problems.extend(mtp_problems(cfg))
    o = cfg.optimization
    if o.lr_scheduler == "wsd" and o.decay_steps and cfg.training.max_steps:
        need(o.warmup_steps + o.decay_steps <= cfg.training.max_steps, "optimization.decay_steps",
             f"warmup ({o.warmup_steps}) plus decay ({o.decay_steps}) exceeds training.max_steps "
             f"({cfg.training.max_steps}); shorten the decay or the warmup")
    d = cfg.distributed
    problems.extend(sequence_parallel_problems(cfg))
    need(not cfg.memory.offload_activations or cfg.memory.gradient_checkpointing, "memory.offload_activations",
         "moves what gradient checkpointing keeps to host memory: turn on memory.gradient_checkpointing, or set "
         "offload_activations: false")
    if d.accelerate_config in REMOVED_STRATEGIES:
        need(False, "distributed.accelerate_config",
             f"{d.accelerate_config} is no longer offered (ZeRO-3 could not partition the kit's 4-bit experts, and "
             f"it was never tested); use fsdp, which shards every 4-bit layer")
    elif d.accelerate_config and d.accelerate_config not in ACCELERATE_CONFIGS:
        need(os.path.isfile(d.accelerate_config), "distributed.accelerate_config",
             f"{d.accelerate_config} does not exist; use one of {', '.join(ACCELERATE_CONFIGS)} or a path")
        kind = _accelerate_distributed_type(d.accelerate_config)
        need(kind not in ("DEEPSPEED", "FSDP"), "distributed.accelerate_config",
             f"{d.accelerate_config} asks Accelerate for {kind}; the kit shards the 4-bit model itself: set "
             f"distributed.accelerate_config: fsdp (FSDP2 with every 4-bit layer sharded), or give a MULTI_GPU config")
    if isinstance(cfg.paths.data_path, list):
        for index, source in enumerate(cfg.paths.data_path):
            need(source.weight > 0, f"paths.data_path[{index}].weight",
                 f"must be > 0 (passes over {source.path} per epoch; remove the source to leave it out), "
                 f"got {source.weight}")
            # Each pass is a copy of the source's documents in the epoch's row layout: bound it.
            need(not source.weight > MAX_SOURCE_WEIGHT, f"paths.data_path[{index}].weight",
                 f"must be <= {MAX_SOURCE_WEIGHT} (passes over {source.path} per epoch), got {source.weight:g}; "
                 f"lower it, or the weights of the other sources instead")
    # Folders the kit writes into: never a filesystem root, and the run never inside the downloaded model.
    for key in ("output_dir", "best_adapter_dir", "scratch_dir"):
        folder = getattr(cfg.paths, key)
        need(os.path.dirname(folder) != folder, f"paths.{key}",
             f"is the filesystem root {folder}; the kit writes (and replaces) files there: name a folder of its own, "
             f"e.g. runs/my-run")
    out, model = cfg.paths.output_dir, cfg.paths.model_dir
    if os.path.dirname(out) != out and _contains(model, out):
        where = "is" if os.path.realpath(out) == os.path.realpath(model) else "lies inside"
        problems.append(f"paths.output_dir: {out} {where} paths.model_dir ({model}); checkpoints and logs would mix "
                        f"with the base model's files: put the run in a folder of its own, e.g. runs/my-run")
    # The best adapter folder is replaced on every improvement: it must not overlap anything else.
    best = cfg.paths.best_adapter_dir
    data_paths = [s.path for s in cfg.paths.data_path] if isinstance(cfg.paths.data_path, list) else []
    for key, other in [(k, getattr(cfg.paths, k)) for k in ("output_dir", "model_dir", "scratch_dir", "data_path")] + \
            [("data_path", path) for path in data_paths]:
        if isinstance(other, str) and (_contains(best, other) or _contains(other, best)):
            where = "contains" if _contains(best, other) else "lies inside"
            problems.append(f"paths.best_adapter_dir: {best} {where} paths.{key} ({other}); the best adapter "
                            f"folder is replaced on each improvement, so give it a folder of its own")
    return problems


def eval_problems(cfg: Config) -> list[str]:
    """Eval set names (unique, usable as tracker keys) and the selection set."""
    problems, names = [], []
    for index, entry in enumerate(cfg.eval.sets):
        key = f"eval.sets[{index}].name"
        if entry.name == HELD_OUT_SET:
            problems.append(f"{key}: {HELD_OUT_SET!r} is the held-out split's name; give this set another name")
        elif not EVAL_SET_NAME.fullmatch(entry.name):
            problems.append(f"{key}: {entry.name!r} must be letters, digits, '_', '.' or '-' (up to 64), "
                            f"starting with a letter or digit: it becomes the tracker key eval/<name>/loss")
        elif entry.name in names:
            problems.append(f"{key}: {entry.name!r} names two eval sets; give each set its own name")
        names.append(entry.name)
    choices = ([HELD_OUT_SET] if cfg.training.val_fraction > 0 else []) + names
    select = cfg.eval.select_by
    if select == HELD_OUT_SET and cfg.training.val_fraction == 0 and names:
        problems.append(f"eval.select_by: the held-out split {HELD_OUT_SET!r} is empty with training.val_fraction "
                        f"0; select one of {', '.join(names)} or raise training.val_fraction")
    elif select != HELD_OUT_SET and select not in names:
        guess = difflib.get_close_matches(select, choices, n=1)
        hint = f"did you mean {guess[0]}? " if guess else ""
        problems.append(f"eval.select_by: {select!r} is not an eval set; {hint}use "
                        f"{' or '.join(choices) or HELD_OUT_SET + ' (with training.val_fraction > 0)'}")
    return problems


def mtp_problems(cfg: Config) -> list[str]:
    """The MTP keys that only mean something with mtp.train (whether the model has an MTP layer is checked at
    load, glmkit/model/load.py)."""
    problems = []
    if cfg.mtp.grad_to_trunk and not cfg.mtp.train:
        problems.append("mtp.grad_to_trunk: needs mtp.train: true (without it there is no MTP loss to send to the "
                        "trunk); set mtp.train: true or mtp.grad_to_trunk: false")
    if cfg.mtp.train and cfg.distributed.sequence_parallel > 1:
        problems.append(f"mtp.train: the MTP layer predicts two tokens ahead, across the slices that "
                        f"distributed.sequence_parallel {cfg.distributed.sequence_parallel} cuts each row into; train "
                        f"it in a run with sequence_parallel 1 (docs/MTP.md)")
    return problems


def sequence_parallel_problems(cfg: Config) -> list[str]:
    """distributed.sequence_parallel against the keys it depends on. The KV heads and the launched process
    count are checked where they are known (glmkit/train/sequence_parallel.py, the memory plan)."""
    size = cfg.distributed.sequence_parallel
    if size == 1:
        return []
    problems = []
    attn = cfg.model.attn_implementation
    if attn != "varlen":
        why = {"sdpa": "sdpa's 4-D block mask covers whole rows, not this process's slice",
               "eager": "eager attention's mask covers whole rows, not this process's slice",
               "flash_attention_2": "flash_attention_2 finds documents from the slice's position_ids alone"}[attn]
        problems.append(f"model.attn_implementation: sequence_parallel {size} needs varlen (each process attends "
                        f"over the whole row's segment boundaries after the all-to-all); {why}: set "
                        f"attn_implementation: varlen or distributed.sequence_parallel: 1")
    processes = cfg.distributed.num_processes
    if processes and processes % size:
        problems.append(f"distributed.sequence_parallel: {size} does not divide distributed.num_processes "
                        f"({processes}); the processes form groups of {size} that share rows: use a divisor of "
                        f"{processes}")
    length = cfg.training.max_seq_length
    if length % size:
        problems.append(f"training.max_seq_length: {length} is not a multiple of distributed.sequence_parallel "
                        f"({size}); each process holds an equal slice of a row: use {length - length % size} or "
                        f"{length - length % size + size}")
    return problems


def tracker_name_problems(names: list[str]) -> list[str]:
    problems = []
    for name in names:
        if name not in TRACKERS:
            guess = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f"did you mean {guess[0]}? " if guess else ""
            problems.append(f"logging.report_to: {name!r} is not a tracker the kit feeds; {hint}"
                            f"use any of {', '.join(TRACKERS)}")
    return problems


def flash_attn_importable() -> bool:
    """transformers' flash_attention_2 path needs the flash-attn package; it has no wheel for torch 2.13."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing package and a broken build (ABI, CUDA) both mean "unusable"
        return False
    return True


def _accelerate_distributed_type(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return ""
    return str(data.get("distributed_type", "") if isinstance(data, dict) else "").upper()
