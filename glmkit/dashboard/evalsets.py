"""Eval sets on the dashboard: one loss curve per set, its change from step 0, its best step.

The trainer's eval records (glmkit/train/evaluation.py) list their sets in `sets` and carry
`<set>/loss`, `<set>/perplexity` and `<set>/tokens`. Logs written before eval sets existed
have only `val_loss` / `perplexity` / `val_tokens`, the held-out split's: they read as the one
set `val`. Step 0 is the base model's loss (eval.at_start): the baseline each change is
measured from, never a "best" (no adapter was trained yet). A positive change on a general-text
set while the domain set falls is forgetting.

A model with an MTP layer adds `<set>/mtp_acceptance` and `<set>/mtp_loss` (glmkit/train/mtp.py): the
share of speculative drafts the servers would accept on that set. Its curve per set and its change
from step 0 sit beside the loss (the `mtp` plot); a falling acceptance is serving getting slower.
"""

from __future__ import annotations

import numpy as np

from .logreader import TableSink, is_step_record, parse_lines
from .tables import StepTable

EVAL_FIELDS = ("val_loss", "perplexity")
SET_FIELDS = ("loss", "perplexity", "tokens", "mtp_acceptance", "mtp_loss")
LEGACY_SET = "val"  # what a record without `sets` measured: the held-out split


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def set_values(record: dict) -> dict[str, tuple[float, ...]]:
    """{set: (loss, perplexity, tokens, mtp_acceptance, mtp_loss)} of one eval record, old or new (NaN: not logged)."""
    names = record.get("sets")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return {n: tuple(_number(record.get(f"{n}/{f}")) for f in SET_FIELDS) for n in names}
    return {LEGACY_SET: (_number(record.get("val_loss")), _number(record.get("perplexity")),
                         _number(record.get("val_tokens")), float("nan"), float("nan"))}


class EvalSink(TableSink):
    """The eval log: the selection set's columns (`val_loss`, `perplexity`) as before, and a table per set.

    Each set's table follows the resume rule on its own: a set added on resume starts where it
    was first measured, and a rewritten step replaces that step's row.
    """

    def __init__(self):
        super().__init__(EVAL_FIELDS)
        self.sets: dict[str, StepTable] = {}
        self.select_by: str | None = None  # the newest record's selection set

    def reset(self) -> None:
        super().reset()
        self.sets = {}
        self.select_by = None

    def feed(self, block: bytes) -> int:
        bad = super().feed(block)
        values, _ = parse_lines(block)  # few and small: one per eval
        rows: dict[str, list[tuple[float, ...]]] = {}
        for record in filter(is_step_record, values):
            for name, numbers in set_values(record).items():
                rows.setdefault(name, []).append((record["step"], _number(record.get("time")), *numbers))
            if isinstance(record.get("select_by"), str):
                self.select_by = record["select_by"]
        for name, numbers in rows.items():
            table = self.sets.setdefault(name, StepTable(SET_FIELDS))
            array = np.array(numbers, dtype=float)
            columns = dict(zip(table.fields, array.T, strict=True))
            columns["step"] = columns["step"].astype(np.int64)
            table.append(columns)
        return bad

    def tables(self) -> list[StepTable]:
        return [self.table, *self.sets.values()]


def set_summary(name: str, table: StepTable, selected: bool) -> dict:
    """One set's row on the page: step 0, latest, change since step 0, best (after step 0)."""
    steps, losses = table.column("step"), table.column("loss")
    finite = np.flatnonzero(np.isfinite(losses))
    row = {"name": name, "evals": int(finite.size), "selected": selected, "baseline_loss": None,
           "latest_loss": None, "latest_step": None, "change": None, "change_pct": None, "best_loss": None,
           "best_step": None, "best_change": None}
    if not finite.size:
        return row
    last = finite[-1]
    row.update(latest_loss=float(losses[last]), latest_step=int(steps[last]))
    if steps[finite[0]] == 0:
        base = float(losses[finite[0]])
        row.update(baseline_loss=base, change=row["latest_loss"] - base,
                   change_pct=100 * (row["latest_loss"] - base) / base if base else None)
    trained = finite[steps[finite] > 0]
    if trained.size:
        best = trained[np.argmin(losses[trained])]
        row.update(best_loss=float(losses[best]), best_step=int(steps[best]))
        if row["baseline_loss"] is not None:
            row["best_change"] = row["best_loss"] - row["baseline_loss"]
    return row | acceptance_summary(table)


def acceptance_summary(table: StepTable) -> dict:
    """One set's MTP acceptance: at step 0, latest, the change between them (in points of the share); None
    where the log has none (no MTP layer, or a log from before it was measured)."""
    steps, accepted = table.column("step"), table.column("mtp_acceptance")
    finite = np.flatnonzero(np.isfinite(accepted))
    row = {"baseline_acceptance": None, "latest_acceptance": None, "acceptance_change": None,
           "latest_mtp_loss": None}
    if not finite.size:
        return row
    last = finite[-1]
    row.update(latest_acceptance=float(accepted[last]), latest_mtp_loss=float(table.column("mtp_loss")[last]))
    if steps[finite[0]] == 0:
        row.update(baseline_acceptance=float(accepted[finite[0]]),
                   acceptance_change=float(accepted[last] - accepted[finite[0]]))
    return row


def eval_sets_stats(sink: EvalSink) -> dict:
    names = sorted(sink.sets, key=lambda n: (n != LEGACY_SET, list(sink.sets).index(n)))  # val first, then as logged
    return {"eval_sets": [set_summary(n, sink.sets[n], n == (sink.select_by or LEGACY_SET)) for n in names],
            "select_by": sink.select_by or LEGACY_SET}


def collect(sink: EvalSink) -> dict:
    """What the eval-sets plot draws (copied out under the monitor's lock)."""
    out = {}
    for name in eval_sets_stats(sink)["eval_sets"]:
        table = sink.sets[name["name"]]
        x, y = table.column("step").copy(), table.column("loss").copy()
        out[name["name"]] = {"x": x, "y": y, "best_step": name["best_step"], "baseline": name["baseline_loss"],
                             "selected": name["selected"]}
    return out


def collect_acceptance(sink: EvalSink) -> dict:
    """What the MTP plot draws: each set's acceptance over the steps it was measured at, and its step-0 value."""
    out = {}
    for name in eval_sets_stats(sink)["eval_sets"]:
        table = sink.sets[name["name"]]
        steps, accepted = table.column("step"), table.column("mtp_acceptance")
        keep = np.isfinite(accepted)
        if keep.any():
            out[name["name"]] = {"x": steps[keep].copy(), "y": accepted[keep].copy(),
                                 "baseline": name["baseline_acceptance"]}
    return out
