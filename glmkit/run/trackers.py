"""Experiment trackers (TensorBoard, W&B, MLflow, trackio), fed the records the JSONL logs hold.

RunLogs hands every record it writes to `Trackers.forward`, so a tracker shows the JSONL's
numbers at the JSONL's steps; the JSONL files stay the source of truth. The clients are
accelerate's tracker classes: this module only chooses their arguments, keeps what identifies
each tracker's run (saved with every checkpoint as part of the loop state, so a resumed run
continues the same tracker run), and makes a tracker that fails cost one warning line, never
the run. Only the main process starts trackers.

Where each tracker writes: under the tracker folder (`paths.tracker_dir`, by default
`<output_dir>/trackers`), unless the library's own variable says otherwise (WANDB_DIR,
MLFLOW_TRACKING_URI, TRACKIO_DIR), which always wins.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from glmkit.config.keys import flatten
from glmkit.config.schema import KIT_ROOT, TRACKERS

# The tracker names and the modules each needs are part of the config's schema (logging.report_to).
REQUIREMENTS = os.path.join(KIT_ROOT, "requirements-trackers.txt")


# ---------------------------------------------------------------------------
# Checks: a tracker whose package is missing (unknown names: glmkit.config.validate).
# ---------------------------------------------------------------------------

def install_problems(names: list[str]) -> list[str]:
    problems = []
    for name in dict.fromkeys(n for n in names if n in TRACKERS):
        missing = [module for module in TRACKERS[name] if not _importable(module)]
        if missing:
            problems.append(f"logging.report_to: {name} needs {', '.join(missing)}, which is not installed; "
                            f"install it with: pip install {pip_line(name)}")
    return problems


def require_installed(cfg) -> None:
    """Exit 2 with one config-error line per tracker in logging.report_to whose package is missing.

    Checked by the trainer and the launcher, not at config load: the dashboard and the other
    scripts read the same YAML and need none of these packages.
    """
    problems = install_problems(cfg.logging.report_to)
    for problem in problems:
        print(f"config error: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(2)


def pip_line(name: str) -> str:
    """The pinned requirements marked for this tracker, e.g. 'wandb==0.31.0'."""
    pins = []
    try:
        with open(REQUIREMENTS, encoding="utf-8") as fh:
            for line in fh:
                requirement, _, comment = line.partition("#")
                marked = comment.strip().removeprefix("for:").split(",") if comment.strip().startswith("for:") else []
                if requirement.strip() and name in (m.strip() for m in marked):
                    pins.append(requirement.strip())
    except OSError:
        pass
    return " ".join(pins) or f"-r {REQUIREMENTS}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------
# What a tracker receives: the numbers of a JSONL record, and the config once.
# ---------------------------------------------------------------------------

def metrics(kind: str, record: dict) -> dict:
    """Tracker values of one JSONL record; {} for kinds that are not metrics (events, errors).

    train / eval: every numeric field, as "train/<field>" / "eval/<field>" (null = NaN in the
    JSONL: left out). experts: per MoE layer its max-over-mean, entropy and number of dead
    experts, and each expert's token count as "expert_load/layer_LL/expert_EEE".
    """
    if kind in ("train", "eval"):
        return {f"{kind}/{key}": value for key, value in record.items()
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)}
    if kind != "experts":
        return {}
    values = {"experts/interval_tokens": record["interval_tokens"]}
    for layer in record["layers"]:
        prefix = f"layer_{layer['layer']:02d}"
        values[f"experts/{prefix}/max_over_mean"] = layer["max_over_mean"]
        values[f"experts/{prefix}/entropy"] = layer["entropy"]
        values[f"experts/{prefix}/dead_experts"] = len(layer["dead_experts"])
        for expert, count in enumerate(layer["counts"]):
            values[f"expert_load/{prefix}/expert_{expert:03d}"] = count
    return values


def hyperparameters(cfg, world_size: int) -> dict:
    """The resolved config as flat "section.key" values that every tracker accepts (lists and null as JSON)."""
    flat = flatten(cfg.to_dict(), world_size)
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in flat.items()}


def tracker_dir(cfg) -> str:
    return cfg.paths.tracker_dir or os.path.join(cfg.paths.output_dir, "trackers")


def run_name(cfg) -> str:
    return cfg.logging.run_name or os.path.basename(cfg.paths.output_dir)


# ---------------------------------------------------------------------------
# The live trackers of a run.
# ---------------------------------------------------------------------------

class Trackers:
    """accelerate trackers by name; any exception from one turns it off with one warning line.

    `runs` names each tracker's run ({"wandb": run id, "mlflow": run id, "trackio": run name,
    "tensorboard": folder}); it is saved in every checkpoint so that a resumed run continues them.
    """

    def __init__(self, logs=None, runs: dict | None = None):
        self.logs = logs
        self.active: dict = {}
        self.runs = dict(runs or {})
        self.step = 0

    def forward(self, kind: str, record: dict) -> None:
        values = metrics(kind, record) if self.active else {}
        if not values:
            return
        self.step = record["step"]
        for name, tracker in list(self.active.items()):
            self.guard(name, "log to", tracker.log, values, step=record["step"])

    def finish(self) -> None:
        for name, tracker in list(self.active.items()):
            self.guard(name, "finish", tracker.finish)
        self.active.clear()

    def guard(self, name: str, action: str, work, *args, **kwargs):
        """Run one tracker call and return its result; on failure warn once, drop the tracker, return None."""
        try:
            return work(*args, **kwargs)
        except Exception as exc:  # whatever a tracker raises (network, credentials, disk), training goes on
            self.active.pop(name, None)
            cause = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            print(f"warning: {name} tracker could not {action} its run ({cause}); it is off for the rest of "
                  f"this run, the JSONL logs are complete", file=sys.stderr, flush=True)
            if self.logs is not None:
                self.logs.event("tracker_failed", self.step, tracker=name, action=action, error=cause)
            return None


def start_trackers(cfg, step: int, runs: dict, logs, world_size: int) -> Trackers:
    """Start every tracker of logging.report_to at `step`, continuing the runs `runs` names (from a checkpoint).

    A tracker that fails to start is reported and left out; the runs of those that start go into `.runs`.
    """
    trackers = Trackers(logs, runs)
    trackers.step = step
    folder = tracker_dir(cfg)
    config = hyperparameters(cfg, world_size)
    for name in dict.fromkeys(cfg.logging.report_to):
        saved = trackers.runs.get(name)
        tracker = trackers.guard(name, "start", _open, name, cfg, folder, saved, step)
        if tracker is None:
            continue
        trackers.active[name] = tracker
        # MLflow params are write-once: a resumed run keeps those its first start recorded.
        if not (name == "mlflow" and saved):
            trackers.guard(name, "record the config in", tracker.store_init_configuration, config)
        if name in trackers.active:
            trackers.runs[name] = _run_id(name, tracker)
    return trackers


def _open(name: str, cfg, folder: str, saved: str | None, step: int):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    os.makedirs(folder, exist_ok=True)
    args, kwargs = _arguments(name, cfg, folder, saved, step)
    tracker = LOGGER_TYPE_TO_CLASS[name](*args, **kwargs)
    tracker.start()
    return tracker


def _arguments(name: str, cfg, folder: str, saved: str | None, step: int) -> tuple[tuple, dict]:
    """accelerate's constructor arguments for one tracker, continuing the run `saved` names if any."""
    project, run = cfg.logging.tracker_project, run_name(cfg)
    if name == "tensorboard":
        # Same folder on resume; purge_step makes TensorBoard drop the earlier attempt's events from
        # the resumed step on, the JSONL resume rule (the latest record of a step wins).
        return (saved or run, os.path.join(folder, "tensorboard")), {"purge_step": step + 1 if saved else None}
    if name == "wandb":
        kwargs = {"name": run, "id": saved, "resume": "allow" if saved else None}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = folder
        return (project,), kwargs
    if name == "mlflow":
        artifacts = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{os.path.join(os.path.abspath(folder), 'mlflow.db')}")
            artifacts = os.path.join(os.path.abspath(folder), "mlflow-artifacts")
        return (project,), {"logging_dir": artifacts, "run_id": saved, "run_name": run}
    # trackio: runs are found by name within a project; TRACKIO_DIR is read when trackio is imported.
    if not os.environ.get("TRACKIO_DIR"):
        os.environ["TRACKIO_DIR"] = os.path.join(os.path.abspath(folder), "trackio")
    return (project,), {"name": saved or run, "resume": "allow" if saved else "never"}


def _run_id(name: str, tracker) -> str:
    if name == "wandb":
        return tracker.run.id
    if name == "mlflow":
        return tracker.active_run.info.run_id
    if name == "trackio":
        return tracker.run.name
    return tracker.run_name  # tensorboard: the folder under <tracker_dir>/tensorboard
