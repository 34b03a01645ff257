"""The run's last words on the console: what was done, where the results are, and what to run next.

A run that lasts days ends with these lines, so they must be enough on their own: the duration and tokens,
each eval set's best loss and where it stood at step 0, the best adapter's and the final checkpoint's paths,
and the commands that use them with those paths filled in.
"""

from __future__ import annotations

import os
import shlex

from glmkit.train.loop_state import LoopState


def duration_text(seconds: float) -> str:
    """'2 h 05 min', '3 min 12 s', '41 s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _shown_path(path: str) -> str:
    """A path as the user would type it from where they are: relative when it lies below the working folder."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def run_summary(state: LoopState, *, config_path: str | None, best_adapter_dir: str, final_checkpoint: str,
                select_by: str, best_adapter_written: bool) -> str:
    """The end-of-run lines (no trailing newline)."""
    rate = state.tokens_seen / state.elapsed_seconds if state.elapsed_seconds > 0 else 0.0
    lines = [f"done: {state.step} steps in {duration_text(state.elapsed_seconds)}, {state.tokens_seen:,} tokens "
             f"trained ({rate:,.0f} tokens/s)"]
    for name, (loss, step) in state.best_by_set.items():
        since = state.baseline_losses.get(name)
        reference = f"; step 0: {since:.4f}" if since is not None else ""
        chosen = " (selects the best adapter)" if name == select_by else ""
        lines.append(f"  eval {name}: best {loss:.4f} at step {step}{' (the base model)' if step == 0 else ''}"
                     f"{reference}{chosen}")
    if best_adapter_written:
        lines.append(f"  best adapter:     {_shown_path(best_adapter_dir)} (step {state.best_step}, "
                     f"{select_by} loss {state.best_val_loss:.4f})")
    else:
        lines.append("  best adapter:     none written (no eval improved on a finite loss); use the final checkpoint")
    lines.append(f"  final checkpoint: {_shown_path(final_checkpoint)}")
    config = f" --config {shlex.quote(_shown_path(config_path))}" if config_path else ""
    adapter = "" if best_adapter_written else f" --adapter {shlex.quote(_shown_path(final_checkpoint))}"
    run_dir = os.path.dirname(final_checkpoint.rstrip(os.sep))
    merged = shlex.quote(_shown_path(run_dir + "-merged"))
    served = shlex.quote(_shown_path(run_dir + "-serving"))
    lines += [
        "next:",
        f"  python use_adapter.py{config}{adapter} --sample \"Once upon a time\"   # generate with the adapter",
        f"  python use_adapter.py{config}{adapter} --merge {merged}   # base + adapter as one checkpoint",
        f"  python use_adapter.py{config}{adapter} --export-serving {served}   # the adapter for vLLM / SGLang",
        f"  ./launch_dashboard.sh{config}   # the run's curves",
    ]
    return "\n".join(lines)
