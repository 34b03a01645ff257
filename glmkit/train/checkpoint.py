"""Checkpoints: the folder format, atomic save, retention, the best adapter, and resume.

A checkpoint is written into `.tmp-checkpoint-<step>/` and renamed to `checkpoint-<step>/`
only after everything (Accelerate state, adapter, tokenizer, resolved config, meta) is on
disk and a `COMPLETE` marker listing every file's size and sha256 (glmkit/run/manifest.py) has
been written, every file and the folder flushed (glmkit/run/swap.py). A folder
without the marker is never resumed from and is cleaned up; a folder whose files no longer
match their marker is skipped by `--resume` (with a warning) in favour of the newest one that
verifies. Only the LoRA adapter is saved, never the 4-bit base.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import yaml

from glmkit.config.keys import config_fields, critical_keys, flatten, keys_checked_otherwise
from glmkit.config.load import move_renamed_keys
from glmkit.config.parse import field_default
from glmkit.config.strategy import strategy
from glmkit.run.checkpoint_names import (
    BEST_ADAPTER_MARKER,
    COMPLETE,
    META,
    checkpoint_path,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    parse_checkpoint_name,
    read_meta,
)
from glmkit.run.manifest import adapter_folder_problem, file_manifest, manifest_problem
from glmkit.run.swap import recover, swap_in
from glmkit.run.writes import WriteFailed, guarded_write
from glmkit.train.consensus import any_process
from glmkit.train.faults import maybe_fail_write, maybe_kill
from glmkit.train.loop_state import LoopState
from glmkit.train.world_size import MOVED_KEYS, WorldSizeChange, keep_global_batch

RESOLVED_CONFIG = "training_config.resolved.yaml"
# Beside paths.output_dir's checkpoint-N while it is rewritten (glmkit/run/swap.py): the new one, the old one.
TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"


class CheckpointError(RuntimeError):
    pass


class ResumeError(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# Cleaning and sizing (naming and finding: glmkit/run/checkpoint_names.py)
# ---------------------------------------------------------------------------

def recover_interrupted_swaps(output_dir: str) -> list[tuple[str, str]]:
    """A kill while checkpoint-N was being replaced: put the whole new (else old) copy back at checkpoint-N.

    Returns [(promoted folder, checkpoint)]. A temp folder is promoted only if its marker verifies, so a
    half-written one is never mistaken for a checkpoint; clean_incomplete removes the rest afterwards.
    """
    promoted = []
    if not os.path.isdir(output_dir):
        return promoted
    names = set(os.listdir(output_dir))
    finals = {name[len(prefix):] for name in names for prefix in (TMP_PREFIX, OLD_PREFIX)
              if name.startswith(prefix) and parse_checkpoint_name(name[len(prefix):])}
    for final in sorted(finals):
        target = os.path.join(output_dir, final)
        came_from = recover(target, os.path.join(output_dir, TMP_PREFIX + final),
                            os.path.join(output_dir, OLD_PREFIX + final),
                            lambda path: is_complete(path) and verify(path) is None)
        if came_from:
            promoted.append((came_from, target))
    return promoted


def clean_incomplete(output_dir: str) -> list[str]:
    """Remove temp folders and checkpoint folders without their marker (a killed write)."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        leftover = name.startswith(TMP_PREFIX) or (name.startswith(OLD_PREFIX)
                                                   and parse_checkpoint_name(name[len(OLD_PREFIX):]))
        partial = leftover or (parse_checkpoint_name(name) and not is_complete(path))
        if partial and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


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


# ---------------------------------------------------------------------------
# The completion marker: every file's size and sha256, verified before a resume loads anything
# ---------------------------------------------------------------------------

def verify(path: str) -> str | None:
    """None if the checkpoint is whole; otherwise what is wrong with it, in a few words."""
    try:
        with open(os.path.join(path, COMPLETE), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return f"its {COMPLETE} marker is missing or unreadable"
    listed = marker.get("files", {}) if isinstance(marker, dict) else {}  # markers before 2026-12 list no files
    problem = manifest_problem(path, listed)
    if problem:
        return problem
    try:
        read_meta(path)
        with open(os.path.join(path, RESOLVED_CONFIG), encoding="utf-8") as fh:
            if not isinstance(yaml.safe_load(fh), dict):
                raise ValueError
    except (OSError, ValueError, yaml.YAMLError):
        return f"{META} or {RESOLVED_CONFIG} is missing or unreadable"
    return None


def finalize(tmp_dir: str, final_dir: str, meta: dict, config_dict: dict) -> None:
    """Write the meta, resolved config and marker into tmp_dir, then rename it into place."""
    with open(os.path.join(tmp_dir, META), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
    with open(os.path.join(tmp_dir, RESOLVED_CONFIG), "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_dict, fh, sort_keys=False)
    marker = {"time": time.time(), "files": file_manifest(tmp_dir)}
    with open(os.path.join(tmp_dir, COMPLETE), "w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=1)
    # swap_in flushes every file and the folder first, and output_dir after. A rerun that reaches the same
    # step (--resume_from an earlier checkpoint) replaces it whole; a kill at any instant leaves the old or
    # the new copy, and recover_interrupted_swaps restores a missing one.
    parent, name = os.path.split(final_dir)
    swap_in(tmp_dir, final_dir, old=os.path.join(parent, OLD_PREFIX + name))


def retention_victims(checkpoints: list[tuple[int, str, float | None]], keep_top_k: int) -> list[str]:
    """Paths to delete: all but the keep_top_k best by val loss, always keeping the latest."""
    regular = [c for c in checkpoints if not os.path.basename(c[1]).startswith("final-")]
    if not regular:
        return []
    latest = max(regular, key=lambda c: c[0])
    ranked = sorted(regular, key=lambda c: (c[2] is None or not math.isfinite(c[2]), c[2] or 0.0, -c[0]))
    keep = {c[1] for c in ranked[:keep_top_k]} | {latest[1]}
    return [c[1] for c in regular if c[1] not in keep]


def best_adapter_is_whole(path: str) -> bool:
    """Its marker is written last, listing every file's size and sha256: a folder carrying it, whose files
    match the list, holds a complete adapter."""
    return os.path.isfile(os.path.join(path, BEST_ADAPTER_MARKER)) and adapter_folder_problem(path) is None


def recover_best_adapter(target: str) -> str | None:
    """A kill inside the best adapter's swap left no paths.best_adapter_dir: restore it from .tmp or .old."""
    return recover(target, f"{target}.tmp", f"{target}.old", best_adapter_is_whole)


def check_best_adapter_dir(target: str) -> None:
    """Refuse to replace a folder the kit did not write: it must be absent, empty, or a previous best adapter."""
    if not os.path.exists(target):
        return
    if not os.path.isdir(target) or (os.listdir(target) and not os.path.isfile(os.path.join(target, BEST_ADAPTER_MARKER))):
        raise CheckpointError(f"paths.best_adapter_dir {target} holds files the kit did not write (no "
                              f"{BEST_ADAPTER_MARKER}); empty it or point paths.best_adapter_dir at a new folder")


# ---------------------------------------------------------------------------
# Saving during training: atomic on every process, retention, the best adapter
# ---------------------------------------------------------------------------

class Checkpointer:
    def __init__(self, accelerator, model, tokenizer, cfg, logs, stats, total_steps: int,
                 data_fingerprint: dict | None = None, sharded=None):
        self.accelerator, self.model, self.tokenizer, self.cfg, self.logs = accelerator, model, tokenizer, cfg, logs
        # fsdp strategy (glmkit.train.fsdp.ShardedState): the adapter is gathered from every rank, the optimizer
        # state goes through torch.distributed.checkpoint instead of Accelerate
        self.sharded = sharded
        self.stats, self.total_steps = stats, total_steps
        self.data_fingerprint = data_fingerprint  # recorded in every meta; a resume compares it (glmkit/data/fingerprint.py)
        self.output_dir = cfg.paths.output_dir
        self.val_losses: dict[str, float | None] = {}
        for _, path in list_checkpoints(self.output_dir):
            self.val_losses[path] = read_meta(path).get("val_loss") if os.path.isfile(os.path.join(path, META)) else None
        # Only LoRA weights go into a checkpoint; the 4-bit base is reloaded from model_dir.
        accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, inp: models.clear())

    def save(self, state: LoopState, final: bool = False) -> str:
        """Write the checkpoint atomically on every process; on any failure remove the partial folder and raise."""
        acc = self.accelerator
        target = checkpoint_path(self.output_dir, state.step, final)
        tmp = os.path.join(self.output_dir, f".tmp-{os.path.basename(target)}")
        if self.stats is not None:  # the open expert-usage interval is training state too
            self.stats.fold_onto_main(lambda x: acc.reduce(x, "sum"))
        meta = {**state.to_meta(), "val_loss": state.val_loss_now(), "world_size": acc.num_processes, "final": final,
                "data_fingerprint": self.data_fingerprint, "strategy": strategy(self.cfg)}
        self._all_or_none(target, tmp, self._prepare_folder, tmp)
        self._all_or_none(target, tmp, acc.save_state, tmp)
        if self.sharded is not None:
            self._all_or_none(target, tmp, self.sharded.save_optimizer, tmp)
        adapter = self._adapter_state()
        self._all_or_none(target, tmp, self._finish, state.step, meta, tmp, target, adapter)
        return target

    def _prepare_folder(self, tmp: str) -> None:
        if self.accelerator.is_main_process:
            check_free_space(self.output_dir, self._estimate_bytes())
            shutil.rmtree(tmp, ignore_errors=True)

    def _adapter_state(self) -> dict | None:
        """The LoRA weights whole, for peft's save_pretrained (every process calls it); None: peft reads the model."""
        return None if self.sharded is None else self.sharded.adapter_state()

    def _finish(self, step: int, meta: dict, tmp: str, target: str, adapter: dict | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        maybe_kill("checkpoint_write", step)
        maybe_fail_write("checkpoint_write", step, tmp)
        self.accelerator.unwrap_model(self.model).save_pretrained(tmp, state_dict=adapter)
        self.tokenizer.save_pretrained(tmp)
        finalize(tmp, target, meta, self.cfg.to_dict())
        self.val_losses[target] = meta["val_loss"]
        self.logs.event("checkpoint_saved", step, path=target, val_loss=meta["val_loss"], size_bytes=folder_bytes(target))
        self._apply_retention(step)

    def _all_or_none(self, target: str, tmp: str, work, *args) -> None:
        """Run one phase of a save on every process; if it failed anywhere, every process raises.

        The flag is reduced across processes (which is also the barrier between phases), so a
        full disk on one node stops the whole job with one message instead of a hang.
        """
        error = None
        try:
            # The partial folder is removed below, by the main process, once every process has stopped.
            with guarded_write("checkpoint", target, intact=self._intact, passes=(CheckpointError,),
                               fix=f"resume with --resume (or fix permissions on {self.output_dir})"):
                work(*args)
        except (WriteFailed, CheckpointError) as exc:
            error = exc
        if not any_process(self.accelerator, error is not None):  # also the barrier between phases
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise WriteFailed(f"could not write checkpoint {target}: another process failed to write its part (its "
                          f"message says why); {self._intact()}; resume with --resume once that is fixed")

    def _intact(self) -> str:
        latest = latest_checkpoint(self.output_dir)
        return f"the latest complete checkpoint, {latest}, is intact" if latest else "no earlier checkpoint exists"

    def _estimate_bytes(self) -> int:
        trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        return 4 * trainable + 64 * 2**20  # adapter + 2 Adam moments + slack for tokenizer and state

    def _apply_retention(self, step: int) -> None:
        entries = [(s, p, self.val_losses.get(p)) for s, p in list_checkpoints(self.output_dir)]
        for path in retention_victims(entries, self.cfg.checkpoint.keep_top_k):
            shutil.rmtree(path, ignore_errors=True)
            self.val_losses.pop(path, None)
            self.logs.event("checkpoint_deleted", step, path=path,
                            reason=f"not among the {self.cfg.checkpoint.keep_top_k} best by val loss nor the latest")

    def checkpoint_at(self, step: int) -> str | None:
        """The checkpoint this step will be saved as, if any (the final one when both are written)."""
        if step == self.total_steps:
            return checkpoint_path(self.output_dir, step, final=True)
        if step % self.cfg.checkpoint.interval == 0:
            return checkpoint_path(self.output_dir, step)
        return None

    def save_best_adapter(self, step: int, val_loss: float, previous: float | None, eval_set: str = "val") -> None:
        """Write the adapter on the main process and swap it in whole; every process stops if that failed."""
        adapter = self._adapter_state()  # every process: under FSDP the LoRA weights are gathered first
        target = self.cfg.paths.best_adapter_dir
        error = None
        if self.accelerator.is_main_process:
            try:
                self._write_best_adapter(target, step, val_loss, eval_set, adapter)
            except (WriteFailed, CheckpointError) as exc:
                error = exc
        if any_process(self.accelerator, error is not None):
            raise error or WriteFailed(f"could not write the best adapter {target}: the main process failed (its "
                                       f"message says why); {self._intact()}; resume with --resume")
        if self.accelerator.is_main_process:
            self.logs.event("best_updated", step, path=target, val_loss=val_loss, previous=previous,
                            checkpoint=self.checkpoint_at(step), eval_set=eval_set)

    def _write_best_adapter(self, target: str, step: int, val_loss: float, eval_set: str, adapter: dict | None) -> None:
        check_best_adapter_dir(target)
        tmp = f"{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        before = (f"the previous best adapter in {target} is intact"  # (its marker: no hashing at every eval)
                  if os.path.isfile(os.path.join(target, BEST_ADAPTER_MARKER))
                  else "no best adapter was written before")
        with guarded_write("the best adapter", target, partial=tmp, passes=(CheckpointError,),
                           intact=lambda: f"{before}; {self._intact()}", fix="resume with --resume"):
            self.accelerator.unwrap_model(self.model).save_pretrained(tmp, state_dict=adapter)
            self.tokenizer.save_pretrained(tmp)
            # Last, listing every other file's size and sha256: use_adapter.py checks them before it reads one.
            marker = {"step": step, "val_loss": val_loss, "eval_set": eval_set, "time": time.time(),
                      "written_by": "glmkit", "files": file_manifest(tmp)}
            with open(os.path.join(tmp, BEST_ADAPTER_MARKER), "w", encoding="utf-8") as fh:
                json.dump(marker, fh)
                fh.write("\n")
            swap_in(tmp, target)  # every file and the folder flushed first, the parent folder after


# ---------------------------------------------------------------------------
# Resume: choose a checkpoint that verifies, check it fits this config, load it
# ---------------------------------------------------------------------------

def compare_configs(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(critical keys that differ, harmless keys that differ) between two flat config dicts."""
    critical_set = set(critical_keys()) | {"world_size"}
    # A checkpoint written before a key existed ran with that key's default (e.g. mtp.train: false).
    saved = {**{key: field_default(f) for key, f in config_fields() if key not in saved}, **saved}
    elsewhere = set(keys_checked_otherwise())  # paths.data_path: by the data fingerprint, after the data is read
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k) and k not in elsewhere]
    return [k for k in changed if k in critical_set], [k for k in changed if k not in critical_set]


def _newest_that_verifies(output_dir: str, print_fn) -> str | None:
    """The newest checkpoint whose files match its marker, after a warning for each newer damaged one; None
    when there is none at all. When every checkpoint is damaged, one line says so (ResumeError)."""
    damaged = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            for skipped, why in damaged:
                print_fn(f"warning: skipping damaged checkpoint {skipped}: {why}")
            return path
        damaged.append((path, problem))
    if damaged:
        newest, why = damaged[0]
        which = f"{len(damaged)} of them; the newest" if len(damaged) > 1 else "the only one"
        raise ResumeError(f"--resume: every checkpoint in {output_dir} is damaged ({which}, {newest}: {why}), so "
                          f"there is nothing to continue from; restore one from a copy, or start a new run in "
                          f"another paths.output_dir")
    return None


@dataclass(frozen=True)
class ResumeDecision:
    """Where a run starts: the checkpoint to continue from (None: step 0), and the grad_accum_steps the run
    must use (the config's, or the one that keeps the checkpoint's global batch on another world size)."""
    path: str | None
    grad_accum_steps: int


def decide_resume(cfg, accelerator, resume: bool, resume_from: str | None) -> ResumeDecision:
    """Which checkpoint to continue from, after checking it fits this config (ResumeError if not).

    `resume`: the newest checkpoint that verifies (--resume); `resume_from`: that folder (--resume_from)."""
    output_dir = cfg.paths.output_dir
    grad_accum = cfg.optimization.grad_accum_steps
    if accelerator.is_main_process:
        for came_from, path in recover_interrupted_swaps(output_dir):
            print(f"restored {path} from {came_from} (a kill interrupted its rewrite)")
        for path in clean_incomplete(output_dir):
            print(f"removed incomplete checkpoint {path} (its write was interrupted)")
    accelerator.wait_for_everyone()
    path = resume_from
    if path:
        if not os.path.isdir(path) or not is_complete(path):
            raise ResumeError(f"--resume_from {path}: not a complete checkpoint (no {COMPLETE} marker)")
        problem = verify(path)
        if problem:
            raise ResumeError(f"--resume_from {path}: the checkpoint is damaged ({problem}); pick another "
                              f"checkpoint-N folder in {output_dir}, or use --resume for the newest that verifies")
    if resume and not path:
        path = _newest_that_verifies(output_dir, accelerator.print)
        if path is None:
            accelerator.print(f"--resume: no complete checkpoint in {output_dir}; starting from step 0")
    if not path:
        if list_checkpoints(output_dir):
            raise ResumeError(f"{output_dir} already holds checkpoints of a run; pass --resume to continue it, "
                              f"or set paths.output_dir to a new folder")
        return ResumeDecision(None, grad_accum)
    with open(os.path.join(path, RESOLVED_CONFIG), encoding="utf-8") as fh:
        saved_config = yaml.safe_load(fh)
    move_renamed_keys(saved_config, [])  # a checkpoint written before keys moved section names them the old way
    saved = flatten(saved_config, read_meta(path).get("world_size"))
    saved_strategy, current_strategy = read_meta(path).get("strategy", "ddp"), strategy(cfg)
    if saved_strategy != current_strategy:
        raise ResumeError(f"cannot resume {path} with distributed.accelerate_config {current_strategy}: it was written "
                          f"by a {saved_strategy} run, whose optimizer state is saved differently; set it back to "
                          f"{saved_strategy}, or start a new run in another paths.output_dir")
    try:
        moved = keep_global_batch(saved, cfg, accelerator.num_processes)
    except WorldSizeChange as exc:
        raise ResumeError(f"{path}: {exc}") from None
    current = flatten(cfg.to_dict(), accelerator.num_processes)
    if moved:
        grad_accum, message = moved
        accelerator.print(message)
        current.update({key: saved.get(key) for key in MOVED_KEYS})
    critical, harmless = compare_configs(saved, current)
    if critical:
        details = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in critical)
        raise ResumeError(f"cannot resume {path}: the checkpoint depends on keys that changed: {details}; "
                          f"restore them or start a new run in another paths.output_dir")
    if harmless:
        accelerator.print(f"resuming {path} with changed settings (allowed): {', '.join(harmless)}")
    accelerator.print(f"resuming from {path}")
    return ResumeDecision(path, grad_accum)


def run_finished(path: str | None, step: int, total_steps: int) -> bool:
    """Whether resuming `path` (at `step`) has nothing left to do: past the last step, or at it with the final
    checkpoint written. A plain checkpoint of the last step (a run stopped between its last update and its
    final save) is not finished: the resume writes the final checkpoint and ends the run as finished."""
    if path is None or step < total_steps:
        return False
    return step > total_steps or bool(read_meta(path).get("final"))


def saved_grad_accum(path: str) -> int:
    """optimization.grad_accum_steps of the run that wrote the checkpoint."""
    with open(os.path.join(path, RESOLVED_CONFIG), encoding="utf-8") as fh:
        return int(yaml.safe_load(fh)["optimization"]["grad_accum_steps"])


def checkpoint_state(path: str) -> LoopState:
    """The loop state a checkpoint was taken at."""
    return LoopState.from_meta(read_meta(path))


def load_checkpoint(accelerator, model, path: str, sharded=None) -> None:
    """Optimizer, scheduler, RNG and data-loader position via Accelerate; the LoRA weights via peft.
    With `sharded` (the fsdp strategy) the LoRA weights and the optimizer state come from it instead."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    accelerator.load_state(path)
    if sharded is not None:
        sharded.load(path)
        return
    weights = load_file(os.path.join(path, "adapter_model.safetensors"))  # copied onto the model's device
    set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
