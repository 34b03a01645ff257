"""Experiment trackers: each one, read back with its own library, holds the JSONL's numbers at the JSONL's
steps; a resumed run continues the same tracker runs; a failing tracker costs one warning; bad input exits 2.

Fully offline: W&B in offline mode, MLflow on a sqlite file, trackio and TensorBoard on local folders,
every library's home and cache folder inside tmp_path, telemetry off.
"""

import contextlib
import glob
import json
import os
import struct

import numpy as np
import pytest
from conftest import ROOT, run_cli

from glmkit.run.logs import latest_per_step, read_jsonl
from glmkit.run.trackers import metrics

ALL = ["tensorboard", "wandb", "mlflow", "trackio"]
SHORT = {"training.max_steps": 2, "logging.eval_interval": 2, "checkpoint.interval": 2,
         "logging.expert_stats_interval": 1, "logging.tracker_project": "kit-test"}
LOGS = {"train": "training_log.jsonl", "eval": "eval_log.jsonl", "experts": "expert_usage_log.jsonl"}


def offline_env(tmp_path) -> dict:
    """Nothing leaves the machine, and nothing is written outside tmp_path."""
    home = tmp_path / "home"
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
            "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_CACHE_DIR": str(home / "wandb-cache"),
            "WANDB_DATA_DIR": str(home / "wandb-data"), "WANDB_ARTIFACT_DIR": str(home / "wandb-artifacts"),
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf"), "GRADIO_ANALYTICS_ENABLED": "False",
            # The kit's tracker folder is what is under test: no outer setting may redirect a tracker.
            "WANDB_DIR": "", "MLFLOW_TRACKING_URI": "", "TRACKIO_DIR": ""}


def expected(out_dir) -> dict:
    """{tracker key: {step: value}} from the JSONL files, latest record per step (the resume rule)."""
    found = {}
    for kind, name in LOGS.items():
        for record in latest_per_step(read_jsonl(os.path.join(out_dir, "logs", name))):
            for key, value in metrics(kind, record).items():
                found.setdefault(key, {})[record["step"]] = value
    return found


def assert_holds(tracker: str, seen: dict, want: dict, as_float32: bool = False) -> None:
    """Every JSONL value is in the tracker at its step, and the tracker has no other step of these keys."""
    assert sorted(seen) == sorted(want), (tracker, sorted(set(seen) ^ set(want))[:10])
    for key, by_step in want.items():
        if as_float32:  # TensorBoard scalars are float32
            by_step = {s: float(np.float32(v)) for s, v in by_step.items()}
        assert seen[key] == by_step, (tracker, key, seen[key], by_step)


# ---- each tracker, read back with its own library --------------------------------------------------

def tensorboard_scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # purges what purge_step retired
    events.Reload()
    found = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)  # one point per step, as TensorBoard draws it
        found[tag] = {e.step: e.value for e in events.Scalars(tag)}
    return found


def wandb_records(path):
    """The records of a .wandb file: wandb's protobuf Record, framed as a LevelDB log (32 KiB blocks,
    7-byte chunk headers crc/length/type; FULL=1, FIRST=2, MIDDLE=3, LAST=4) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_runs(folder) -> list[dict]:
    """Per offline run folder, oldest first: its run id, history {key: {step: value}} and config."""
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "wandb", "offline-run-*", "*.wandb"))):
        run = {"id": None, "history": {}, "config": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_"):
                        run["history"].setdefault(key, {})[record.history.step.num] = value
            elif kind == "config":
                run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        runs.append(run)
    return runs


def mlflow_runs(db_path, experiment: str) -> list[dict]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db_path}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    found = []
    for run in runs:
        history = {}
        for key in run.data.metrics:
            points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)
            history[key] = {m.step: m.value for m in points}  # the later attempt at a step wins
        found.append({"id": run.info.run_id, "name": run.info.run_name, "history": history,
                      "params": run.data.params})
    return found


def trackio_run(trackio_dir, project: str, run: str, env: dict) -> dict:
    """trackio's own storage API, in a fresh process: trackio fixes its folder when it is imported."""
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            f"print(json.dumps({{'runs': S.get_run_records({project!r}), 'logs': S.get_logs({project!r}, {run!r}), "
            f"'config': S.get_run_config({project!r}, {run!r})}}))")
    result = run_cli(["-c", code], env={**env, "TRACKIO_DIR": str(trackio_dir)})
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    history = {}
    for row in found["logs"]:  # in the order written: a later attempt at a step wins
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                history.setdefault(key, {})[row["step"]] = value
    return {"runs": found["runs"], "history": history, "config": found["config"]}


def only(history: dict, want: dict) -> dict:
    """The tracker's series for the JSONL's keys (W&B and trackio add their own system series)."""
    return {key: history.get(key, {}) for key in want}


# ---- the end-to-end run -----------------------------------------------------------------------------

@pytest.mark.trains
def test_every_tracker_holds_the_jsonl_and_a_resumed_run_continues_the_same_runs(make_config, tmp_path):
    env = offline_env(tmp_path)
    config = make_config({**SHORT, "logging.report_to": ALL})
    out = tmp_path / "run"
    first = run_cli(["train_qlora.py", "--config", config], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "warning:" not in first.stderr
    first_ids = json.load(open(out / "final-checkpoint-2" / "trainer_meta.json"))["tracker_runs"]
    assert sorted(first_ids) == sorted(ALL)

    resumed = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=4"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning:" not in resumed.stderr
    assert json.load(open(out / "final-checkpoint-4" / "trainer_meta.json"))["tracker_runs"] == first_ids

    # tokens_seen: cumulative non-pad input tokens, continued across the resume
    train = latest_per_step(read_jsonl(str(out / "logs" / "training_log.jsonl")))
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["tokens_seen"] for r in train] == list(np.cumsum([r["tokens"] for r in train]))

    want = expected(str(out))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens_seen",
            "eval/val_loss", "eval/perplexity", "eval/val/loss", "eval/val/tokens", "experts/layer_01/max_over_mean", "experts/layer_01/dead_experts",
            "expert_load/layer_01/expert_000"} <= set(want)
    assert sorted(want["train/tokens_seen"]) == [1, 2, 3, 4] and sorted(want["eval/val_loss"]) == [0, 2, 4]
    trackers = out / "trackers"

    # TensorBoard: one folder for the run, both attempts' event files in it
    assert os.listdir(trackers / "tensorboard") == ["run"]
    assert_holds("tensorboard", tensorboard_scalars(trackers / "tensorboard" / "run"), want, as_float32=True)

    # W&B: two offline run folders, one run id
    runs = wandb_runs(str(trackers))
    assert [r["id"] for r in runs] == [first_ids["wandb"]] * 2
    history = {}
    for run in runs:
        for key, by_step in run["history"].items():
            history.setdefault(key, {}).update(by_step)
    assert_holds("wandb", only(history, want), want)
    assert runs[0]["config"]["lora.r"] == 8 and runs[1]["config"]["training.max_steps"] == 4

    # MLflow: one run in the experiment, carrying all four steps
    (mlflow_run,) = mlflow_runs(trackers / "mlflow.db", "kit-test")
    assert mlflow_run["id"] == first_ids["mlflow"] and mlflow_run["name"] == "run"
    assert_holds("mlflow", mlflow_run["history"], want)
    assert mlflow_run["params"]["lora.r"] == "8" and mlflow_run["params"]["training.max_steps"] == "2"

    # trackio: one run of that name, resumed rather than created again
    found = trackio_run(trackers / "trackio", "kit-test", "run", env)
    assert [r["name"] for r in found["runs"]] == ["run"]
    assert_holds("trackio", only(found["history"], want), want)
    assert found["config"]["training.max_steps"] == 4


@pytest.mark.trains
def test_a_killed_run_resumes_with_the_latest_record_of_each_step_winning(make_config, tmp_path):
    """Steps logged after the last checkpoint are logged again by the resumed run; TensorBoard (purge_step)
    and MLflow (latest point of a step) then agree with the JSONL's resume rule, and tokens_seen repeats exactly."""
    env = offline_env(tmp_path)
    config = make_config({**SHORT, "training.max_steps": 4, "logging.report_to": ["tensorboard", "mlflow"]})
    out = tmp_path / "run"
    killed = run_cli(["train_qlora.py", "--config", config], env={**env, "GLMKIT_FAULT_KILL_AT": "mid_step:4"})
    assert killed.returncode < 0
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    records = read_jsonl(str(out / "logs" / "training_log.jsonl"))
    attempts = {}
    for record in records:
        attempts.setdefault(record["step"], []).append(record)
    assert [len(attempts[s]) for s in (1, 2, 3, 4)] == [1, 1, 2, 1]  # step 3 ran before the kill and after
    first, again = attempts[3]
    assert again["tokens_seen"] == first["tokens_seen"] == attempts[2][0]["tokens_seen"] + first["tokens"]
    assert attempts[4][0]["tokens_seen"] == again["tokens_seen"] + attempts[4][0]["tokens"]

    want = expected(str(out))
    trackers = out / "trackers"
    scalars = tensorboard_scalars(trackers / "tensorboard" / "run")
    assert_holds("tensorboard", scalars, want, as_float32=True)
    (mlflow_run,) = mlflow_runs(trackers / "mlflow.db", "kit-test")
    assert_holds("mlflow", mlflow_run["history"], want)
    # Not vacuous: the clock fields of the two attempts at step 3 differ, and the trackers hold the second.
    assert again["elapsed_seconds"] != first["elapsed_seconds"]
    assert mlflow_run["history"]["train/elapsed_seconds"][3] == again["elapsed_seconds"]


# ---- a tracker failing at run time ------------------------------------------------------------------

def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_failing_tracker_costs_one_warning_and_the_others_go_on(make_config, tmp_path, monkeypatch, capsys):
    """MLflow loses its server mid-run (a real connection refused): one warning line, MLflow is dropped,
    TensorBoard keeps receiving every record. A tracker that cannot start at all is left out the same way."""
    import mlflow

    from glmkit.config.load import load_config
    from glmkit.run.logs import RunLogs
    from glmkit.run.trackers import start_trackers

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config(make_config({"logging.report_to": ["mlflow", "tensorboard"], "logging.tracker_project": "p"}))
    logs = RunLogs(cfg.logs_dir)
    logs.trackers = start_trackers(cfg, 0, {}, logs, world_size=1)
    assert sorted(logs.trackers.active) == ["mlflow", "tensorboard"]
    logs.write("train", 1, loss=2.5, lr=1e-3)
    mlflow.set_tracking_uri(f"http://127.0.0.1:{closed_port()}")  # the tracking server goes away
    for step in (2, 3, 4):
        logs.write("train", step, loss=2.5 - step / 10, lr=1e-3)
    assert sorted(logs.trackers.active) == ["tensorboard"]
    logs.close()
    # mlflow still holds the dropped run as active and would end it at exit, retrying for minutes:
    # end it here, while requests fail fast (ending pops it before the request fails).
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        mlflow.end_run()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mlflow tracker could not log to its run (")
    assert warnings[0].endswith("it is off for the rest of this run, the JSONL logs are complete")
    assert tensorboard_scalars(os.path.join(cfg.paths.output_dir, "trackers", "tensorboard", "run"))["train/loss"] \
        == {s: float(np.float32(2.5 - s / 10 if s > 1 else 2.5)) for s in (1, 2, 3, 4)}
    (event,) = [e for e in read_jsonl(os.path.join(cfg.logs_dir, "events_log.jsonl")) if e["event"] == "tracker_failed"]
    assert (event["tracker"], event["step"]) == ("mlflow", 2)
    assert [r["step"] for r in read_jsonl(os.path.join(cfg.logs_dir, "training_log.jsonl"))] == [1, 2, 3, 4]

    # A tracking server that is not there from the start: MLflow is left out, TensorBoard starts.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    started = start_trackers(cfg, 0, {}, None, world_size=1)
    assert sorted(started.active) == ["tensorboard"]
    started.finish()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mlflow tracker could not start its run (")


def test_metrics_are_the_records_numbers():
    record = {"step": 7, "time": 1.0, "loss": 2.0, "lr": 1e-4, "aux_loss": None, "tokens_seen": 4096, "flag": True}
    assert metrics("train", record) == {"train/loss": 2.0, "train/lr": 1e-4, "train/tokens_seen": 4096}
    experts = {"step": 7, "interval_tokens": 10, "num_experts": 2, "top_k": 1,
               "layers": [{"layer": 1, "counts": [10, 0], "max_over_mean": 2.0, "entropy": 0.0, "dead_experts": [1]}]}
    assert metrics("experts", experts) == {
        "experts/interval_tokens": 10, "experts/layer_01/max_over_mean": 2.0, "experts/layer_01/entropy": 0.0,
        "experts/layer_01/dead_experts": 1, "expert_load/layer_01/expert_000": 10, "expert_load/layer_01/expert_001": 0}
    assert metrics("events", {"step": 1, "event": "eval", "val_loss": 1.0}) == {}
    assert metrics("eval", {"step": 1, "time": 2.0, "val_loss": None, "val_tokens": 5}) == {"eval/val_tokens": 5}


# ---- bad input ----------------------------------------------------------------------------------------

@pytest.mark.trains
def test_unknown_tracker_is_one_config_line(make_config):
    config = make_config({"logging.report_to": ["tensorbord"]})
    result = run_cli(["train_qlora.py", "--config", config])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "config error: logging.report_to: 'tensorbord' is not a tracker the kit feeds; did you mean tensorboard? "
        "use any of tensorboard, wandb, mlflow, trackio"]


# A Python where wandb is not installed: an import hook in front of every finder reports it missing.
WITHOUT_WANDB = """
import runpy, sys
class NoWandb:
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoWandb())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0].endswith(".py") else runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.trains
@pytest.mark.parametrize("entry", ["train_qlora.py", "glmkit.launch.env"])
def test_missing_tracker_package_is_one_config_line_with_the_pip_line(make_config, entry):
    config = make_config({"logging.report_to": ["tensorboard", "wandb"]})
    result = run_cli(["-c", WITHOUT_WANDB, entry, "--config", config])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    pin = next(line.split()[0] for line in open(os.path.join(ROOT, "requirements-trackers.txt"))
               if line.startswith("wandb=="))
    assert result.stderr.strip().splitlines() == [
        f"config error: logging.report_to: wandb needs wandb, which is not installed; install it with: pip install {pin}"]


def test_requirements_pin_every_tracker_the_readme_quotes_them_and_make_test_installs_them():
    from glmkit.run.trackers import TRACKERS, pip_line

    logs_doc = open(os.path.join(ROOT, "docs", "LOGS.md"), encoding="utf-8").read()
    for name in TRACKERS:
        assert all("==" in requirement for requirement in pip_line(name).split()), name
        assert f"`pip install {pip_line(name)}`" in logs_doc, name
    assert "-r requirements-trackers.txt" in open(os.path.join(ROOT, "requirements-dev.txt")).read().splitlines()
