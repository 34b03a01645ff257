"""MoE routing health: per-layer load, imbalance, dead experts, collapse flag."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .logreader import is_step_record, parse_lines
from .tables import StepTable

# Thresholds for "routing looks collapsed".  Entropy is normalised to [0, 1]
# (1 = uniform); ln(8)/ln(128) ~ 0.43 is all tokens on 8 of 128 experts.
COLLAPSE_MIN_ENTROPY = 0.6
COLLAPSE_MAX_OVER_MEAN = 8.0
COLLAPSE_DEAD_FRACTION = 0.25

SUMMARY_FIELDS = ("mean_entropy", "min_entropy", "max_over_mean", "dead_experts")


def _valid_layers(record: dict) -> list[dict]:
    layers = record.get("layers")
    if not isinstance(layers, list):
        return []
    return [layer for layer in layers if isinstance(layer, dict) and isinstance(layer.get("counts"), list)]


def _num(value, default=float("nan")) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _finite_stat(reduce, values: list[float]) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(reduce(values)) if values.size else float("nan")


def summarise(record: dict) -> dict[str, float]:
    layers = _valid_layers(record)
    entropy = [_num(layer.get("entropy")) for layer in layers]
    imbalance = [_num(layer.get("max_over_mean")) for layer in layers]
    dead = sum(len(layer.get("dead_experts") or []) for layer in layers)
    return {
        "mean_entropy": _finite_stat(np.mean, entropy),
        "min_entropy": _finite_stat(np.min, entropy),
        "max_over_mean": _finite_stat(np.max, imbalance),
        "dead_experts": float(dead),
    }


class ExpertSink:
    """Summaries per record in a StepTable, full records only for the newest few."""

    KEEP_FULL = 16  # enough to fall back on after a resume drops the newest

    def __init__(self):
        self.table = StepTable(SUMMARY_FIELDS)
        self.recent: OrderedDict[int, dict] = OrderedDict()

    def reset(self) -> None:
        self.table.clear()
        self.recent.clear()

    def feed(self, block: bytes) -> int:
        values, bad = parse_lines(block)
        records = [v for v in values if is_step_record(v) and _valid_layers(v)]
        bad += len(values) - len(records)
        if records:
            rows = [summarise(r) for r in records]
            columns = {k: np.array([row[k] for row in rows]) for k in SUMMARY_FIELDS}
            columns["step"] = np.array([r["step"] for r in records], dtype=float)
            columns["time"] = np.array([_num(r.get("time")) for r in records])
            self.table.append(columns)
            for r in records:
                self.recent.pop(r["step"], None)
                self.recent[r["step"]] = r
            while len(self.recent) > self.KEEP_FULL:
                self.recent.popitem(last=False)
        return bad

    def current(self) -> dict | None:
        step = self.table.last("step")
        return self.recent.get(int(step)) if step is not None else None


def layer_view(layer: dict) -> dict:
    counts = np.asarray([_num(c, 0.0) for c in layer["counts"]])
    mean = counts.mean() if counts.size else 0.0
    dead = [int(e) for e in (layer.get("dead_experts") or []) if isinstance(e, int)]
    return {
        "layer": layer.get("layer"),
        "max_over_mean": _num(layer.get("max_over_mean"), float(counts.max() / mean) if mean else float("nan")),
        "entropy": _num(layer.get("entropy")),
        "dead_experts": dead,
        "load": (counts / mean).round(3).tolist() if mean else counts.tolist(),
        "hottest_expert": int(counts.argmax()) if counts.size else None,
    }


def collapse_reasons(layers: list[dict], num_experts: int) -> list[str]:
    reasons = []
    for layer in layers:
        name = f"layer {layer['layer']}"
        if layer["entropy"] < COLLAPSE_MIN_ENTROPY:
            reasons.append(f"{name}: routing entropy {layer['entropy']:.2f} < {COLLAPSE_MIN_ENTROPY}")
        if layer["max_over_mean"] > COLLAPSE_MAX_OVER_MEAN:
            reasons.append(f"{name}: hottest expert at {layer['max_over_mean']:.1f}x the mean load")
        if num_experts and len(layer["dead_experts"]) >= COLLAPSE_DEAD_FRACTION * num_experts:
            reasons.append(f"{name}: {len(layer['dead_experts'])}/{num_experts} experts received no tokens")
    return reasons


def collapse_explanation(demo_model: bool) -> str:
    """What the collapse warning means, whether it matters for this run, and what to change."""
    meaning = (f"Routing entropy is 1.0 when a layer spreads its tokens evenly over its experts and 0 when it sends "
               f"them all to one; below {COLLAPSE_MIN_ENTROPY} a few experts take most of the tokens.")
    if demo_model:
        return (f"{meaning} Expected on the tiny demo model: its routers are random and were never trained, and its "
                f"short recipe moves the hidden states they read; nothing to change here.")
    return (f"{meaning} On a real model the training has moved the hidden states the (frozen) routers read, so "
            f"fewer experts do the work: lower optimization.learning_rate, mix general text into paths.data_path, "
            f"and watch whether the eval sets' losses suffer (docs/TROUBLESHOOTING.md).")


def latest_expert_state(record: dict | None, demo_model: bool = False) -> dict:
    """Payload of /api/experts for the newest usage record (`demo_model`: the run trains the tiny demo model)."""
    if record is None:
        return {"available": False, "reason": "no expert usage logged yet", "layers": []}
    layers_in = _valid_layers(record)
    num_experts = int(_num(record.get("num_experts"), len(layers_in[0]["counts"]) if layers_in else 0))
    layers = [layer_view(layer) for layer in layers_in]
    reasons = collapse_reasons(layers, num_experts)
    summary = summarise(record)
    return {
        "available": True,
        "step": record.get("step"),
        "time": record.get("time"),
        "num_experts": num_experts,
        "top_k": record.get("top_k"),
        "interval_tokens": record.get("interval_tokens"),
        "mean_entropy": summary["mean_entropy"],
        "min_entropy": summary["min_entropy"],
        "max_over_mean": summary["max_over_mean"],
        "dead_experts_total": int(summary["dead_experts"]),
        "collapsed": bool(reasons),
        "collapse_reasons": reasons[:20],
        "collapse_explanation": collapse_explanation(demo_model) if reasons else None,
        "layers": layers,
    }
