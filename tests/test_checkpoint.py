"""Checkpoint bookkeeping on its own: retention ranking, cleanup of killed writes, the atomic swap, best gating."""

import math
import os

import pytest
import torch

from glmkit.train import checkpoint as ckpt
from glmkit.train.evaluation import adapter_is_finite, improves


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


@pytest.mark.parametrize("adapter_value, val_loss, expect_best", [
    (0.5, 6.0, True),
    (float("nan"), 6.0, False),   # an improved val loss, but the adapter holds a NaN: never the best
    (float("inf"), 6.0, False),
    (0.5, float("nan"), False),
    (0.5, 7.5, False),            # finite, but worse than the best so far
])
def test_best_adapter_needs_a_better_finite_val_loss_and_finite_weights(adapter_value, val_loss, expect_best):
    adapter = torch.nn.Linear(2, 2)
    with torch.no_grad():
        adapter.weight[0, 0] = adapter_value
    assert (improves(val_loss, 7.0) and adapter_is_finite(adapter)) is expect_best
    assert improves(val_loss, None) is math.isfinite(val_loss)
