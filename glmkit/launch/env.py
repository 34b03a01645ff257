"""What launch_training.sh needs from the YAML, as shell-safe KEY=value lines.

    eval "$(python -m glmkit.launch.env --config training_config.yaml [--set k=v ...])"

The launcher never parses YAML or re-derives a path itself: every path, the process
count, the Accelerate config and the checkpoint to resume from come from here, resolved
by glmkit.config.load exactly as the trainer resolves them. Values are quoted with
shlex.quote, so any path survives `eval`. A bad config exits 2 with one line per problem; so does an
output folder or event log that can't be read (a file where a folder belongs, or the reverse).
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys

from glmkit.config.cli import add_config_arguments, config_from_args
from glmkit.config.strategy import accelerate_config_path, strategy
from glmkit.data.sources import DataError, describe, resolve_sources
from glmkit.run.checkpoint_names import latest_checkpoint
from glmkit.run.logs import LOG_FILES, read_jsonl
from glmkit.run.trackers import require_installed


def visible_gpus() -> int:
    """CUDA devices this process can see (CUDA_VISIBLE_DEVICES applies); 0 without CUDA. A Linux machine
    without NVIDIA device files has none: answered without importing torch (a second of every launch)."""
    if sys.platform == "linux" and not glob.glob("/dev/nvidia[0-9]*"):
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def last_run_status(logs_dir: str) -> str:
    """`status` of the last run_end event ("finished", "preempted", ...), or "" if none (or unreadable as text).

    Only the launcher's informational message depends on it, so a log with bytes that are not UTF-8
    does not block a launch; a log that is not a readable file raises OSError (the trainer appends to it).
    """
    try:
        events = read_jsonl(os.path.join(logs_dir, LOG_FILES["events"]))
    except UnicodeDecodeError:
        return ""
    ends = [e for e in events if isinstance(e, dict) and e.get("event") == "run_end"]
    return str(ends[-1].get("status", "")) if ends else ""


def data_problem(cfg) -> str:
    """Why paths.data_path can't be used (nothing matched, an unsupported file, ...), or "" if it can."""
    try:
        resolve_sources(cfg.paths.data_path, cfg.training.text_field)
    except DataError as exc:
        return str(exc)
    return ""


def launch_values(cfg) -> dict[str, str]:
    acc = accelerate_config_path(cfg)
    return {
        "KIT_CONFIG": cfg.source_path or "",
        "KIT_MODEL_NAME": cfg.model.name_or_path,
        "KIT_MODEL_DIR": cfg.paths.model_dir,
        "KIT_DATA_PATH": describe(cfg.paths.data_path),
        "KIT_DATA_PROBLEM": data_problem(cfg),
        "KIT_TEXT_FIELD": cfg.training.text_field,
        "KIT_OUTPUT_DIR": cfg.paths.output_dir,
        "KIT_LOGS_DIR": cfg.logs_dir,
        "KIT_SCRATCH_DIR": cfg.paths.scratch_dir,
        # Processes per machine; empty means one per visible GPU.
        "KIT_NUM_PROCESSES": str(cfg.distributed.num_processes or ""),
        "KIT_ACCELERATE_CONFIG": acc or "",
        "KIT_STRATEGY": strategy(cfg),
        "KIT_VISIBLE_GPUS": str(visible_gpus()),
        "KIT_LATEST_CHECKPOINT": latest_checkpoint(cfg.paths.output_dir) or "",
        "KIT_RUN_STATUS": last_run_status(cfg.logs_dir),
    }


def format_lines(values: dict[str, str]) -> str:
    return "\n".join(f"{key}={shlex.quote(value)}" for key, value in values.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmkit.launch.env", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    require_installed(cfg)
    try:
        values = launch_values(cfg)
    except OSError as exc:
        where = exc.filename or cfg.paths.output_dir
        print(f"error: {where}: cannot be read ({exc.strerror or exc}); it belongs to the run in paths.output_dir: "
              "fix or move it aside, or set paths.output_dir to a new folder", file=sys.stderr)
        return 2
    print(format_lines(values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
