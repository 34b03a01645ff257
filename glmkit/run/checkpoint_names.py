"""How checkpoints are named and found: folders `checkpoint-<step>` and `final-checkpoint-<step>`, the files
in them that readers other than the trainer look for, and the newest complete one.

The one definition, shared by the trainer (glmkit/train/checkpoint.py) and the dashboard. It lives apart from
checkpoint.py because that module imports torch, and the dashboard, which runs next to training for days,
must stay light (tests/test_dashboard.py checks that it never imports torch).
"""

from __future__ import annotations

import json
import os
import re

COMPLETE = "COMPLETE"  # written last: a folder without it is unfinished
# Written last into paths.best_adapter_dir: only a folder carrying it (or an empty one) is ever replaced.
BEST_ADAPTER_MARKER = "best.json"
META = "trainer_meta.json"
CHECKPOINT_NAME = re.compile(r"(final-)?checkpoint-([0-9]+)")
# A step fits in int64; longer digit runs are not names this kit wrote (and int() of 4,301+ digits raises).
MAX_STEP_DIGITS = 18


def checkpoint_path(output_dir: str, step: int, final: bool = False) -> str:
    return os.path.join(output_dir, f"{'final-' if final else ''}checkpoint-{step}")


def parse_checkpoint_name(name: str) -> tuple[int, bool] | None:
    """(step, final) if `name` is a folder name `checkpoint_path` writes, else None."""
    match = CHECKPOINT_NAME.fullmatch(name)
    if match is None or len(match.group(2)) > MAX_STEP_DIGITS:
        return None
    return int(match.group(2)), bool(match.group(1))


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first; final-checkpoint sorts after its step."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        parsed = parse_checkpoint_name(name)
        path = os.path.join(output_dir, name)
        if parsed and not os.path.islink(path) and is_complete(path):
            found.append((parsed[0], int(parsed[1]), path))
    return [(step, path) for step, _, path in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META), encoding="utf-8") as fh:
        return json.load(fh)
