"""Checkpoint bookkeeping on its own: retention ranking, cleanup of killed writes, the atomic swap, best gating."""

import math
import os

import pytest
import torch

from glmkit import checkpoint as ckpt
from glmkit import training


def make_checkpoint(root, name: str, complete: bool = True) -> str:
    path = os.path.join(root, name)
    os.makedirs(path)
    if complete:
        open(os.path.join(path, ckpt.COMPLETE), "w").close()
    return path


def test_retention_keeps_top_k_by_val_loss_plus_the_latest(tmp_path):
    entries = [(10, "a/checkpoint-10", 7.0), (20, "a/checkpoint-20", 6.0), (30, "a/checkpoint-30", float("nan")),
               (40, "a/checkpoint-40", 6.5), (50, "a/checkpoint-50", None), (50, "a/final-checkpoint-50", 6.9)]
    victims = ckpt.retention_victims(entries, keep_top_k=2)
    # best two: 20 (6.0) and 40 (6.5); latest: 50 (no val loss); NaN never ranks as good; final- is never deleted
    assert sorted(victims) == ["a/checkpoint-10", "a/checkpoint-30"]
    assert ckpt.retention_victims(entries, keep_top_k=10) == []


def test_incomplete_folders_are_never_listed_and_are_cleaned(tmp_path):
    root = str(tmp_path)
    make_checkpoint(root, "checkpoint-10")
    make_checkpoint(root, "checkpoint-20", complete=False)  # killed between rename and marker: impossible, but safe
    make_checkpoint(root, ".tmp-checkpoint-30", complete=False)
    make_checkpoint(root, "final-checkpoint-10")
    os.makedirs(os.path.join(root, "logs"))
    assert ckpt.list_checkpoints(root) == [(10, os.path.join(root, "checkpoint-10")),
                                           (10, os.path.join(root, "final-checkpoint-10"))]
    assert ckpt.latest_checkpoint(root) == os.path.join(root, "final-checkpoint-10")
    removed = sorted(os.path.basename(p) for p in ckpt.clean_incomplete(root))
    assert removed == [".tmp-checkpoint-30", "checkpoint-20"]
    assert sorted(os.listdir(root)) == ["checkpoint-10", "final-checkpoint-10", "logs"]


def test_swap_in_replaces_the_folder_whole(tmp_path):
    target, tmp = tmp_path / "best", tmp_path / "best.tmp"
    target.mkdir()
    (target / "adapter.txt").write_text("old")
    tmp.mkdir()
    (tmp / "adapter.txt").write_text("new")
    ckpt.swap_in(str(tmp), str(target))
    assert (target / "adapter.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["best"]  # no .tmp or .old left behind


class RecordingCheckpointer:
    def __init__(self):
        self.best = []

    def save_best_adapter(self, step, val_loss, previous):
        self.best.append((step, val_loss, previous))


class NullLogs:
    def write(self, *args, **kwargs):
        pass

    event = write


@pytest.mark.parametrize("adapter_value, val_loss, expect_best", [
    (0.5, 6.0, True),
    (float("nan"), 6.0, False),   # an improved val loss, but the adapter holds a NaN: never the best
    (float("inf"), 6.0, False),
    (0.5, float("nan"), False),
])
def test_best_adapter_needs_a_finite_val_loss_and_finite_weights(monkeypatch, adapter_value, val_loss, expect_best):
    adapter = torch.nn.Linear(2, 2)
    with torch.no_grad():
        adapter.weight[0, 0] = adapter_value
    monkeypatch.setattr(training, "evaluate", lambda *args: (val_loss, 100))
    state = {**training.fresh_state(), "best_val_loss": 7.0, "best_step": 5}
    checkpointer = RecordingCheckpointer()
    training.run_eval(state, 10, adapter, [{"input_ids": [1]}], None, None, NullLogs(), checkpointer, 1)
    assert (checkpointer.best == [(10, 6.0, 7.0)]) is expect_best
    assert state["best_val_loss"] == (6.0 if expect_best else 7.0)
    assert state["last_eval_step"] == 10 and (state["last_val_loss"] == val_loss or math.isnan(val_loss))
