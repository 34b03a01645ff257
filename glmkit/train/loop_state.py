"""The training loop's state: what a checkpoint restores and what the loop advances, step by step.

Frozen on purpose: helpers return a new state (`dataclasses.replace`) instead of changing one
behind the reader's back, so every change of it is visible in train_qlora.py's loop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from glmkit.config.schema import HELD_OUT_SET


@dataclass(frozen=True)
class LoopState:
    step: int = 0                        # optimizer steps done
    epoch: int = 0                       # epoch of the last step's micro-batches
    tokens_seen: int = 0                 # non-pad input tokens trained on, all processes, across resumes
    trained_tokens_seen: int = 0         # of those, the loss targets (chat: the trained tokens only)
    nan_skips: int = 0                   # consecutive steps skipped for a non-finite loss or grad norm
    elapsed_seconds: float = 0.0         # wall time of the run so far, across resumes
    best_val_loss: float | None = None   # the best adapter's loss on the selection set (eval.select_by)
    best_step: int | None = None
    best_eval_set: str | None = None     # that set's name (None: no best yet, or a checkpoint from before eval sets)
    last_val_loss: float | None = None   # the latest eval's, and the step it ran at
    last_eval_step: int | None = None
    tracker_runs: dict = field(default_factory=dict)  # glmkit.run.trackers: the run each tracker continues on resume
    baseline_losses: dict = field(default_factory=dict)  # {eval set: loss at step 0}: each eval line's reference
    best_by_set: dict = field(default_factory=dict)      # {eval set: [lowest loss, its step]}: the end summary's

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> "LoopState":
        """The state in a checkpoint's meta; keys an older checkpoint lacks keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names})

    def selecting_by(self, eval_set: str, changed_sets=()) -> "LoopState":
        """This state ranking the best adapter by `eval_set`. A best found on another set (eval.select_by
        changed on resume), or on this set before its documents changed (`changed_sets`: a resume with
        --allow-data-change), is not comparable, so it is forgotten and the next eval sets a new best."""
        ranked_by = self.best_eval_set or HELD_OUT_SET  # checkpoints from before eval sets ranked by val
        if self.best_val_loss is None or (ranked_by == eval_set and eval_set not in changed_sets):
            return dataclasses.replace(self, best_eval_set=eval_set)
        return dataclasses.replace(self, best_eval_set=eval_set, best_val_loss=None, best_step=None)

    def after_eval(self, step: int, losses: dict[str, float], selected: float) -> "LoopState":
        """This state once an eval at `step` measured `losses` ({set: loss}; `selected` is the selection set's)."""
        best = dict(self.best_by_set)
        for name, loss in losses.items():
            if math.isfinite(loss) and (name not in best or loss < best[name][0]):
                best[name] = [loss, step]
        baseline = {**losses, **self.baseline_losses} if step == 0 else self.baseline_losses
        return dataclasses.replace(self, last_val_loss=selected, last_eval_step=step, best_by_set=best,
                                   baseline_losses=baseline)

    def val_loss_now(self) -> float | None:
        """The val loss of this very step, if an eval ran at it (checkpoints are ranked by it)."""
        return self.last_val_loss if self.last_eval_step == self.step else None
