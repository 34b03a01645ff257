"""Checkpoint I/O: atomic folders, top-K retention by val loss, the best adapter, resume checks.

A checkpoint is written into `.tmp-checkpoint-<step>/` and renamed to `checkpoint-<step>/`
only after everything (Accelerate state, adapter, tokenizer, resolved config, meta) is on
disk and a `COMPLETE` marker has been written. A folder without the marker is never
resumed from and is cleaned up. Only the LoRA adapter is saved, never the 4-bit base.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time

import yaml

COMPLETE = "COMPLETE"
META = "trainer_meta.json"
RESOLVED_CONFIG = "training_config.resolved.yaml"
_CHECKPOINT = re.compile(r"^(final-)?checkpoint-(\d+)$")

# Keys whose change makes a checkpoint meaningless to continue from.
CRITICAL_KEYS = [
    "model.name_or_path", "model.revision", "paths.model_dir", "paths.data_path",
    "training.seed", "training.max_seq_length", "training.val_fraction", "training.text_field",
    "training.packing", "training.padding", "optimization.micro_batch_per_gpu",
    "optimization.grad_accum_steps", "lora.r", "lora.alpha", "lora.target_modules",
    "lora.target_parameters", "quantization.load_in_4bit", "quantization.quant_type",
    "quantization.double_quant", "quantization.compute_dtype", "quantization.quantize_experts",
    "quantization.blocksize", "world_size",
]


class CheckpointError(RuntimeError):
    pass


def checkpoint_path(output_dir: str, step: int, final: bool = False) -> str:
    return os.path.join(output_dir, f"{'final-' if final else ''}checkpoint-{step}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first; final-checkpoint sorts after its step."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and not os.path.islink(path) and is_complete(path):
            found.append((int(match.group(2)), 1 if match.group(1) else 0, path))
    return [(step, path) for step, _, path in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def clean_incomplete(output_dir: str) -> list[str]:
    """Remove temp folders and checkpoint folders without their marker (a killed write)."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        partial = name.startswith(".tmp-") or (_CHECKPOINT.match(name) and not is_complete(path))
        if partial and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META), encoding="utf-8") as fh:
        return json.load(fh)


def folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def check_free_space(directory: str, needed_bytes: int) -> None:
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise CheckpointError(f"not enough disk space in {directory}: {free / 2**30:.2f} GiB free, "
                              f"a checkpoint needs about {needed_bytes / 2**30:.2f} GiB; free space or move "
                              f"paths.output_dir (earlier checkpoints are intact)")


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())


def finalize(tmp_dir: str, final_dir: str, meta: dict, config_dict: dict) -> None:
    """Write the meta, resolved config and marker into tmp_dir, then rename it into place."""
    with open(os.path.join(tmp_dir, META), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
    with open(os.path.join(tmp_dir, RESOLVED_CONFIG), "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_dict, fh, sort_keys=False)
    _fsync_tree(tmp_dir)
    with open(os.path.join(tmp_dir, COMPLETE), "w", encoding="utf-8") as fh:
        fh.write(f"{time.time()}\n")
        fh.flush()
        os.fsync(fh.fileno())
    if os.path.exists(final_dir):  # a rerun that reaches the same step replaces it whole
        shutil.rmtree(final_dir)
    os.rename(tmp_dir, final_dir)


def swap_in(tmp_dir: str, target_dir: str) -> None:
    """Replace target_dir with tmp_dir so that a reader sees the old or the new folder, whole."""
    old = f"{target_dir}.old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(target_dir):
        os.rename(target_dir, old)
    os.rename(tmp_dir, target_dir)
    shutil.rmtree(old, ignore_errors=True)


def retention_victims(checkpoints: list[tuple[int, str, float | None]], keep_top_k: int) -> list[str]:
    """Paths to delete: all but the keep_top_k best by val loss, always keeping the latest."""
    regular = [c for c in checkpoints if not os.path.basename(c[1]).startswith("final-")]
    if not regular:
        return []
    latest = max(regular, key=lambda c: c[0])
    ranked = sorted(regular, key=lambda c: (c[2] is None or not math.isfinite(c[2]), c[2] or 0.0, -c[0]))
    keep = {c[1] for c in ranked[:keep_top_k]} | {latest[1]}
    return [c[1] for c in regular if c[1] not in keep]


def compare_configs(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(critical keys that differ, harmless keys that differ) between two flat config dicts."""
    keys = sorted(set(saved) | set(current))
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    critical = [k for k in changed if k in CRITICAL_KEYS]
    harmless = [k for k in changed if k not in CRITICAL_KEYS]
    return critical, harmless


def flatten(config_dict: dict, world_size: int) -> dict:
    flat = {f"{section}.{key}": value for section, values in config_dict.items() if isinstance(values, dict)
            for key, value in values.items()}
    flat["world_size"] = world_size
    return flat
