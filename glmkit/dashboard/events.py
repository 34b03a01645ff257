"""One-line descriptions of timeline events, shared by the API and the page."""

from __future__ import annotations

import os

# Large payloads that belong to /api/run, not to every timeline entry.
HEAVY_KEYS = ("config", "model_audit")


def _fmt(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _name(path) -> str:
    return os.path.basename(str(path).rstrip("/")) if path else "?"


def _size(value) -> str:
    if not isinstance(value, (int, float)):
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f", {value:.0f} {unit}" if unit == "B" else f", {value:.1f} {unit}"
        value /= 1024
    return ""


def describe(e: dict) -> str:
    kind = e.get("event")
    if kind == "run_start":
        return (f"Run started: {e.get('total_steps', '?')} steps, world size {e.get('world_size', '?')}, "
                f"effective batch {e.get('effective_batch', '?')}")
    if kind == "eval":
        losses = e.get("losses")
        if isinstance(losses, dict) and losses:  # a trainer with eval sets: every set's loss
            what = "Baseline evaluation (base model)" if e.get("baseline") else "Evaluation"
            return f"{what}: " + ", ".join(f"{name} {_fmt(loss)}" for name, loss in losses.items())
        return f"Evaluation: val loss {_fmt(e.get('val_loss'))}, perplexity {_fmt(e.get('perplexity'), '.2f')}"
    if kind == "checkpoint_saved":
        return f"Saved {_name(e.get('path'))} (val loss {_fmt(e.get('val_loss'))}{_size(e.get('size_bytes'))})"
    if kind == "checkpoint_deleted":
        return f"Deleted {_name(e.get('path'))} ({e.get('reason') or 'no reason given'})"
    if kind == "best_updated":
        return f"New best: {_name(e.get('checkpoint') or e.get('path'))} at val loss {_fmt(e.get('val_loss'))}"
    if kind == "resume":
        return f"Resumed from step {e.get('from_step', '?')} ({_name(e.get('checkpoint'))})"
    if kind == "nan_skipped":
        return (f"Skipped a non-finite step (loss {e.get('loss')}, grad norm {e.get('grad_norm')}, "
                f"{e.get('consecutive', '?')} in a row)")
    if kind == "preempted":
        return f"Preempted by {e.get('signal', 'a signal')}"
    if kind == "run_end":
        return f"Run ended: {e.get('status', '?')} (final checkpoint {_name(e.get('final_checkpoint'))})"
    return str(kind or "unknown event")


def timeline_entry(e: dict) -> dict:
    entry = {k: v for k, v in e.items() if k not in HEAVY_KEYS}
    entry["summary"] = describe(e)
    return entry
