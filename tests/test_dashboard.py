"""Dashboard tests with Flask's test client over temporary, seeded log folders."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
from conftest import run_cli
from fakes import FakeRun, finished_run, loss_at, tokens_at, tokens_seen_at

from glmkit.dashboard import create_app
from glmkit.dashboard.fastjsonl import parse_uniform_block
from glmkit.dashboard.series import downsample_indices, ema, ema_last

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_client(run_or_dir, **kwargs):
    logs = run_or_dir.logs_dir if isinstance(run_or_dir, FakeRun) else str(run_or_dir)
    kwargs.setdefault("min_poll_interval", 0)  # tests append between requests
    return create_app(logs, **kwargs).test_client()


def stats(client, **params) -> dict:
    response = client.get("/api/stats", query_string=params)
    assert response.status_code == 200
    return response.get_json()


@pytest.fixture
def run(tmp_path):
    fake = FakeRun(tmp_path / "run", total_steps=100)
    fake.start()
    return fake


# -- reading the logs ------------------------------------------------------


def test_malformed_lines_are_counted_and_skipped(run):
    run.steps(1, 5)
    run.append_raw("train", "this is not json\n")
    run.append_raw("train", '{"loss": 1.0, "time": 1}\n')  # no step
    run.append_raw("train", "[1, 2]\n")
    run.steps(6, 8)
    client = make_client(run)
    s = stats(client)
    assert s["step"] == 8
    assert s["bad_lines"] == 3
    assert s["bad_lines_by_file"]["training_log.jsonl"] == 3
    assert client.get("/api/series/loss").get_json()["x"] == list(range(1, 9))


def test_a_negative_step_never_wipes_the_history(run):
    """One valid line with "step": -5 counted as a resume from before step 1 and emptied /api/series/loss;
    so did a resume event from step -5. Both are dropped (the line counted as bad), the history stays."""
    run.steps(1, 5)
    client = make_client(run)
    assert client.get("/api/series/loss").get_json()["x"] == [1, 2, 3, 4, 5]
    run.train(-5)  # the trainer's own record shape: the fast parser reads it too
    run.event("resume", -5, from_step=-5, checkpoint="checkpoint-x")
    run.steps(6, 8)
    assert client.get("/api/series/loss").get_json()["x"] == list(range(1, 9))
    s = stats(client)
    assert s["step"] == 8 and s["bad_lines_by_file"]["training_log.jsonl"] == 1
    run.append_raw("train", json.dumps({"step": -5, "loss": 1.0, "time": run.tick()}) + "\n")  # alone in a block
    assert client.get("/api/series/loss").get_json()["x"] == list(range(1, 9))


def test_unfinished_last_line_is_held_back_until_complete(run):
    run.steps(1, 3)
    line = json.dumps({"step": 4, "time": time.time(), "loss": 0.5, "lr": 1e-4, "grad_norm": 1.0,
                       "tokens_per_sec": 10.0}) + "\n"
    run.append_raw("train", line[:20])
    client = make_client(run)
    s = stats(client)
    assert (s["step"], s["bad_lines"]) == (3, 0)
    run.append_raw("train", line[20:])
    s = stats(client)
    assert (s["step"], s["loss"], s["bad_lines"]) == (4, 0.5, 0)


def test_each_poll_reads_only_appended_bytes(run):
    run.steps(1, 50)
    app = create_app(run.logs_dir, min_poll_interval=0)
    client = app.test_client()
    stats(client)
    monitor = app.extensions["glmkit_dashboard"].monitor
    tail = monitor.tails["train"]
    fed = []
    original = tail.sink.feed
    tail.sink.feed = lambda block: fed.append(block) or original(block)
    size_before = os.path.getsize(run.path("train"))
    run.steps(51, 52)
    stats(client)
    with open(run.path("train"), "rb") as fh:
        assert b"".join(fed) == fh.read()[size_before:]
    assert tail.offset == os.path.getsize(run.path("train"))


def test_truncated_or_replaced_file_starts_over(run):
    run.steps(1, 40)
    client = make_client(run)
    assert stats(client)["step"] == 40
    with open(run.path("train"), "w") as fh:  # truncated in place: a new run
        fh.write("")
    run.steps(1, 3)
    assert stats(client)["step"] == 3
    assert client.get("/api/series/loss").get_json()["x"] == [1, 2, 3]
    replacement = FakeRun(run.output_dir + "-new", total_steps=100)
    replacement.steps(1, 60)  # larger than before, so only the inode tells
    os.replace(replacement.path("train"), run.path("train"))
    assert stats(client)["step"] == 60
    assert len(client.get("/api/series/loss").get_json()["x"]) == 60


def test_rewritten_file_that_grew_past_the_offset_is_noticed(run):
    run.steps(1, 5)
    client = make_client(run)
    assert stats(client)["step"] == 5
    with open(run.path("train"), "r+") as fh:  # same inode, bigger, different head
        fh.seek(0)
        fh.truncate()
    other = FakeRun(run.output_dir, total_steps=100)
    for step in range(100, 120):
        other.train(step)
    data = client.get("/api/series/loss").get_json()
    assert data["x"][0] == 100 and len(data["x"]) == 20


def test_resumed_run_is_one_curve_with_latest_records_winning(run):
    run.steps(1, 30, eval_every=10)
    run.event("preempted", 30, signal="SIGTERM")
    client = make_client(run)
    assert stats(client)["status"] == "preempted"
    run.event("resume", 20, from_step=20, checkpoint=os.path.join(run.output_dir, "checkpoint-20"))
    s = stats(client)
    # The killed attempt's eval at step 30 is superseded as soon as the resume is logged.
    assert s["step"] == 20 and s["val_step"] == 20 and s["status"] == "running"
    for step in range(21, 26):
        run.train(step, loss=0.25)
    series = client.get("/api/series/loss").get_json()
    assert series["x"] == list(range(1, 26))
    assert series["y"][20:] == [0.25] * 5
    assert series["y"][19] == pytest.approx(loss_at(20))


def test_same_step_written_twice_keeps_the_latest(run):
    run.train(1, loss=1.0)
    run.train(2, loss=2.0)
    run.train(2, loss=3.0)
    run.train(3, loss=4.0)
    client = make_client(run)
    series = client.get("/api/series/loss").get_json()
    assert (series["x"], series["y"]) == ([1, 2, 3], [1.0, 3.0, 4.0])


def test_fast_path_matches_json_and_declines_odd_blocks():
    records = [{"step": i, "time": 1.7e9 + i, "loss": (None if i == 3 else 1.0 / (i + 1)), "lr": 2e-05 * i,
                "grad_norm": float(i), "tokens_per_sec": 1e4, "aux_loss": None} for i in range(50)]
    block = "".join(json.dumps(r) + "\n" for r in records).encode()
    fields = ("step", "time", "loss", "lr", "grad_norm", "tokens_per_sec", "missing")
    columns = parse_uniform_block(block, fields)
    assert columns is not None
    for name in fields:
        expected = [r.get(name) for r in records]
        expected = np.array([np.nan if v is None else v for v in expected], dtype=float)
        np.testing.assert_array_equal(columns[name], expected)
    assert parse_uniform_block(block.replace(b'"lr"', b'"lx"', 1), fields) is None
    assert parse_uniform_block(block + b"garbage\n", fields) is None
    assert parse_uniform_block(block.replace(b'"time": 1', b'"time": "x', 1), fields) is None


# -- statuses ------------------------------------------------------------


def test_empty_folder_says_so_everywhere(tmp_path):
    for logs in (tmp_path / "missing" / "logs", tmp_path):
        client = make_client(logs)
        s = stats(client)
        assert s["status"] == "waiting"
        assert s["step"] is None and s["best_val_loss"] is None and s["bad_lines"] == 0
        assert client.get("/api/series/loss").get_json()["x"] == []
        assert client.get("/api/checkpoints").get_json()["checkpoints"] == []
        assert client.get("/api/events").get_json()["events"] == []
        assert client.get("/api/experts").get_json()["available"] is False
        assert client.get("/api/errors").get_json()["errors"] == []
        for plot in ("loss", "validation", "experts"):
            response = client.get(f"/api/plots/{plot}.png")
            assert response.status_code == 200 and response.data.startswith(PNG_MAGIC)
        assert b"No run yet" in client.get("/static/dashboard/dashboard.js").data


def test_finished_run(tmp_path):
    run = finished_run(tmp_path / "run", total_steps=60)
    s = stats(make_client(run))
    assert s["status"] == "finished"
    assert (s["step"], s["total_steps"], s["progress"], s["eta_seconds"]) == (60, 60, 1.0, 0.0)
    assert s["best_val_step"] == 60 and s["best_val_loss"] == pytest.approx(loss_at(60) + 0.1)
    assert s["perplexity"] == pytest.approx(math.exp(loss_at(60) + 0.1))
    assert s["val_trend"] < 0
    assert s["loss"] == pytest.approx(loss_at(60))


def test_crashed_run_and_errors(run):
    run.steps(1, 10)
    run.error(10)
    client = make_client(run)
    assert stats(client)["status"] == "crashed"
    errors = client.get("/api/errors").get_json()
    assert errors["total"] == 1 and errors["errors"][0]["type"] == "OutOfMemoryError"
    run.event("resume", 10, from_step=10, checkpoint="checkpoint-10")  # the error predates this attempt
    assert stats(client)["status"] == "running"


def test_running_then_stalled(run):
    run.steps(1, 10)
    client = make_client(run, stall_seconds=60)
    assert stats(client)["status"] == "running"
    old = time.time() - 3600
    for name in ("train", "events"):
        os.utime(run.path(name), (old, old))
    s = stats(client)
    assert s["status"] == "stalled" and s["seconds_since_write"] > 3000


def test_progress_and_training_numbers(run):
    run.steps(1, 25)
    s = stats(make_client(run))
    assert (s["step"], s["total_steps"]) == (25, 100)
    assert s["progress"] == pytest.approx(0.25)
    assert s["eta_seconds"] == pytest.approx(150.0)
    assert s["steps_per_sec"] == 0.5 and s["seconds_per_step"] == pytest.approx(2.0)
    losses = np.array([loss_at(i) for i in range(1, 26)])
    assert s["loss_smoothed"] == pytest.approx(ema(losses, 0.6)[-1])
    assert stats(make_client(run), smoothing=0.9)["loss_smoothed"] == pytest.approx(ema(losses, 0.9)[-1])


def test_tokens_seen_is_the_latest_records_cumulative_count(run):
    run.steps(1, 25)
    s = stats(make_client(run))
    assert s["tokens_seen"] == tokens_seen_at(25) and s["tokens_seen_estimated"] is False
    assert s["tokens"] == tokens_at(25)  # the last step's own count, as before


def test_tokens_seen_follows_a_resume(run):
    run.steps(1, 30)
    client = make_client(run)
    run.event("resume", 20, from_step=20, checkpoint=os.path.join(run.output_dir, "checkpoint-20"))
    assert stats(client)["tokens_seen"] is None  # the killed attempt's records are superseded
    run.steps(21, 24)
    assert stats(client)["tokens_seen"] == tokens_seen_at(24)


def test_tokens_seen_of_a_log_that_predates_it_is_an_estimate(tmp_path):
    old = FakeRun(tmp_path / "old", total_steps=100, with_tokens_seen=False)
    old.steps(1, 30)
    client = make_client(old)
    assert stats(client)["tokens_seen"] == tokens_seen_at(30)
    old.steps(31, 33)  # the running sum is extended, not recomputed
    assert stats(client)["tokens_seen"] == tokens_seen_at(33)
    old.event("resume", 20, from_step=20, checkpoint="checkpoint-20")
    for step in range(21, 26):
        old.train(step)
    s = stats(client)
    # Under the resume rule each step counts once: steps 21-33 of the killed attempt are gone.
    assert s["tokens_seen"] == tokens_seen_at(25) and s["tokens_seen_estimated"] is True
    assert stats(make_client(old))["tokens_seen"] == tokens_seen_at(25)
    sparse = FakeRun(tmp_path / "sparse", total_steps=100, with_tokens_seen=False)
    for step in (5, 10, 15):  # log_interval 5: each record stands for the 5 steps up to it
        sparse.train(step)
    assert stats(make_client(sparse))["tokens_seen"] == 5 * (tokens_at(5) + tokens_at(10) + tokens_at(15))


# -- series maths -----------------------------------------------------------


def test_ema_is_debiased_like_tensorboard():
    np.testing.assert_allclose(ema(np.array([1.0, 2.0, 3.0]), 0.5), [1.0, 5 / 3, 17 / 7])
    np.testing.assert_allclose(ema(np.array([4.0, 4.0, 4.0]), 0.9), [4.0, 4.0, 4.0])
    out = ema(np.array([1.0, np.nan, 3.0]), 0.5)  # NaN passes through, does not count
    assert out[0] == 1.0 and np.isnan(out[1]) and out[2] == pytest.approx((0.25 + 1.5) / 0.75)
    rng = np.random.default_rng(0)
    values = rng.standard_normal(20_000)
    for weight in (0.3, 0.9, 0.999):
        expected, state = [], 0.0
        for t, v in enumerate(values, start=1):
            state = weight * state + (1 - weight) * v
            expected.append(state / (1 - weight**t))
        np.testing.assert_allclose(ema(values, weight), expected, rtol=1e-9, atol=1e-9)
        assert ema_last(values, weight) == pytest.approx(expected[-1], abs=1e-12)
        assert ema_last(values[-15_000:], weight, more_before=True) in (None, pytest.approx(expected[-1], abs=1e-12))
    assert ema_last(values[-100:], 0.999, more_before=True) is None  # tail shorter than the EMA's memory


def test_series_smoothing_parameter(run):
    run.steps(1, 40)
    data = make_client(run).get("/api/series/loss?smoothing=0.8").get_json()
    raw = np.array([loss_at(i) for i in range(1, 41)])
    np.testing.assert_allclose(data["y"], ema(raw, 0.8))
    np.testing.assert_allclose(data["raw"], raw)


def test_downsampling_keeps_extremes_first_and_last():
    rng = np.random.default_rng(1)
    values = rng.standard_normal(10_001)
    values[1234], values[7777] = 50.0, -50.0
    idx = downsample_indices(values, 100)
    assert len(idx) <= 100
    assert idx[0] == 0 and idx[-1] == len(values) - 1
    assert {1234, 7777} <= set(idx.tolist())
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(downsample_indices(values[:50], 100), np.arange(50))


def test_series_endpoint_downsamples_and_keeps_spike(run):
    for step in range(1, 3001):
        run.train(step, loss=9.0 if step == 1777 else 1.0 + step * 1e-4)
    data = make_client(run).get("/api/series/loss?max_points=200").get_json()
    assert data["points"] <= 200 and data["total_points"] == 3000
    assert data["x"][0] == 1 and data["x"][-1] == 3000
    assert 1777 in data["x"] and max(data["y"]) == 9.0
    assert len(make_client(run).get("/api/series/loss").get_json()["x"]) <= 1500


def test_csv_export(run):
    run.steps(1, 30)
    response = make_client(run).get("/api/series/loss?format=csv&smoothing=0.5")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    lines = response.get_data(as_text=True).strip().splitlines()
    assert lines[0] == "step,loss,loss_smoothed"
    assert len(lines) == 31
    step, loss, smoothed = lines[1].split(",")
    assert (int(step), float(loss), float(smoothed)) == (1, loss_at(1), pytest.approx(loss_at(1)))


@pytest.mark.parametrize("name", ["lr", "grad_norm", "tokens_per_sec", "val_loss", "perplexity"])
def test_every_series_is_served(run, name):
    run.steps(1, 20, eval_every=5)
    data = make_client(run).get(f"/api/series/{name}").get_json()
    assert data["name"] == name and len(data["x"]) == (4 if name in ("val_loss", "perplexity") else 20)


@pytest.mark.parametrize("query", ["smoothing=1", "smoothing=-0.1", "smoothing=abc", "max_points=1",
                                   "max_points=x", "format=xml"])
def test_bad_query_parameters_are_400(run, query):
    response = make_client(run).get(f"/api/series/loss?{query}")
    assert response.status_code == 400 and response.get_json()["status"] == 400


# -- the other endpoints ----------------------------------------------------


def test_checkpoints_from_disk_and_events(tmp_path):
    run = finished_run(tmp_path / "run", total_steps=60)
    os.makedirs(os.path.join(run.output_dir, ".tmp-checkpoint-60"))
    os.makedirs(os.path.join(run.output_dir, "checkpoint-abc"))
    outside = tmp_path / "outside" / "checkpoint-99"
    outside.mkdir(parents=True)
    os.symlink(outside, os.path.join(run.output_dir, "checkpoint-99"))
    data = make_client(run).get("/api/checkpoints").get_json()
    rows = data["checkpoints"]
    assert [c["name"] for c in rows] == ["checkpoint-20", "checkpoint-40"]
    assert [c["best"] for c in rows] == [False, True] and data["best"]["step"] == 40
    assert all(c["complete"] and c["size_bytes"] >= 4096 and c["time"] for c in rows)
    assert rows[0]["val_loss"] == pytest.approx(loss_at(20) + 0.1)


def test_best_checkpoint_saved_as_final_checkpoint(tmp_path):
    run = FakeRun(tmp_path / "run", total_steps=30)
    run.start()
    run.steps(1, 30)
    run.checkpoint(20, 2.5)
    final = os.path.join(run.output_dir, "final-checkpoint-30")
    os.rename(run.checkpoint(30, 2.9), final)  # the trainer names the last one final-checkpoint-<step>
    run.event("best_updated", 30, path="best", val_loss=2.4, checkpoint=os.path.join(run.output_dir, "checkpoint-30"))
    data = make_client(run).get("/api/checkpoints").get_json()
    assert data["best"]["name"] == "final-checkpoint-30" and data["best"]["final"]


def test_events_timeline(tmp_path):
    run = finished_run(tmp_path / "run")
    events = make_client(run).get("/api/events").get_json()["events"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert "config" not in events[0] and "steps" in events[0]["summary"]
    assert any(e["summary"].startswith("New best: checkpoint-40") for e in events)


def test_experts_latest_and_collapse_flag(run):
    run.experts(10)
    client = make_client(run)
    data = client.get("/api/experts").get_json()
    assert data["available"] and not data["collapsed"] and data["step"] == 10
    assert len(data["layers"]) == 6 and data["layers"][2]["dead_experts"] == [5]
    assert data["dead_experts_total"] == 1
    run.experts(20, collapsed=True)
    data = client.get("/api/experts").get_json()
    assert data["collapsed"] and data["step"] == 20 and data["collapse_reasons"]


def test_gpu_endpoint_without_gpu_gives_reason(run):
    data = make_client(run).get("/api/gpu").get_json()
    assert isinstance(data["gpus"], list)
    if not data["gpus"]:
        assert data["reason"]


def test_gpu_cards_through_nvml(run, monkeypatch):
    import sys
    import types

    memory = types.SimpleNamespace(used=30 * 2**30, total=80 * 2**30)
    fake = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97),
        nvmlDeviceGetMemoryInfo=lambda h: memory,
        nvmlDeviceGetTemperature=lambda h, sensor: 61,
        nvmlDeviceGetPowerUsage=lambda h: 612_000,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 1 / 0,  # an unsupported sensor
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    data = make_client(run).get("/api/gpu").get_json()
    assert data["reason"] is None and [g["index"] for g in data["gpus"]] == [0, 1]
    gpu = data["gpus"][1]
    assert (gpu["name"], gpu["utilization"], gpu["temperature"], gpu["power_watts"]) == \
        ("NVIDIA H100 80GB HBM3", 97, 61, 612.0)
    assert gpu["memory_used"] == 30 * 2**30 and gpu["power_limit_watts"] is None


def test_plots_are_pngs_cached_until_data_changes(run):
    run.steps(1, 30, eval_every=10, expert_every=10)
    run.checkpoint(10, 2.0)
    client = make_client(run)
    for name in ("loss", "lr", "grad_norm", "throughput", "validation", "experts"):
        response = client.get(f"/api/plots/{name}.png")
        assert response.status_code == 200 and response.data.startswith(PNG_MAGIC), name
    first = client.get("/api/plots/loss.png")
    again = client.get("/api/plots/loss.png", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    run.train(31)
    changed = client.get("/api/plots/loss.png", headers={"If-None-Match": first.headers["ETag"]})
    assert changed.status_code == 200 and changed.headers["ETag"] != first.headers["ETag"]


def test_page_and_health(run):
    client = make_client(run)
    page = client.get("/")
    assert page.status_code == 200 and b'id="stat-step"' in page.data
    assert b"http://" not in page.data and b"https://" not in page.data  # nothing from a CDN
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert client.get("/health").get_json()["status"] == "ok"
    assert client.get("/static/dashboard/dashboard.css").status_code == 200


# -- safety -----------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/api/plots/..%2F..%2Fetc%2Fpasswd.png",
    "/api/plots/../../training_dashboard.py",
    "/api/plots/%2e%2e%2ftraining_log.png",
    "/api/plots/training_log.png",
    "/api/series/..%2Flogs%2Ftraining_log",
    "/api/series/%2e%2e",
    "/api/series/config",
    "/static/..%2F..%2Ftraining_dashboard.py",
    "/static/../glmkit/dashboard/app.py",
    "/static/%2e%2e/%2e%2e/etc/passwd",
    "/logs/training_log.jsonl",
    "/api/checkpoints/..%2F..%2Fetc",
])
def test_path_tricks_are_404(run, path):
    run.steps(1, 3)
    assert make_client(run).get(path).status_code == 404


def test_symlinked_log_file_is_not_followed(run, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"step": 999, "time": 1.0, "loss": 1.0}) + "\n")
    os.symlink(secret, run.path("train"))
    assert stats(make_client(run))["step"] is None


def test_a_log_file_replaced_by_a_directory_is_reported_not_a_500(run):
    run.steps(1, 10, eval_every=5)
    run.checkpoint(10, 2.0)
    client = make_client(run)
    assert stats(client)["step"] == 10
    os.remove(run.path("train"))
    os.mkdir(run.path("train"))
    os.remove(run.path("events"))
    os.symlink(run.path("eval"), run.path("events"))
    meta = os.path.join(run.output_dir, "checkpoint-10", "trainer_meta.json")
    os.remove(meta)
    os.mkdir(meta)
    for path in ("/api/stats", "/api/series/loss", "/api/series/val_loss", "/api/plots/loss.png", "/api/checkpoints",
                 "/api/events", "/api/run", "/api/experts", "/api/errors", "/", "/health"):
        assert client.get(path).status_code == 200, path
    s = stats(client)
    assert s["log_problems"] == {"training_log.jsonl": "is a directory, not a log file",
                                 "events_log.jsonl": "is a symbolic link, which is not followed"}
    assert s["step"] is None and s["val_step"] == 10  # what can be read still is
    assert client.get("/api/checkpoints").get_json()["checkpoints"][0]["name"] == "checkpoint-10"
    os.rmdir(run.path("train"))
    run.steps(1, 4)
    s = stats(client)
    assert s["step"] == 4 and s["log_problems"] == {"events_log.jsonl": "is a symbolic link, which is not followed"}


@pytest.mark.parametrize("query", ["/api/series/loss?max_points=", "/api/events?limit=", "/api/errors?limit=",
                                   "/api/series/loss?format=csv&max_points="])
def test_a_number_of_thousands_of_digits_is_a_400(run, query):
    run.steps(1, 3)
    response = make_client(run).get(query + "9" * 4301)
    assert response.status_code == 400 and "must be an integer in" in response.get_json()["detail"]
    assert make_client(run).get(query + "0" * 4301 + "5").status_code == 400


def test_checkpoint_names_are_the_trainers(tmp_path):
    from glmkit.run.checkpoint_names import checkpoint_path, parse_checkpoint_name

    assert parse_checkpoint_name(os.path.basename(checkpoint_path("out", 120))) == (120, False)
    assert parse_checkpoint_name(os.path.basename(checkpoint_path("out", 7, final=True))) == (7, True)
    for name in ("checkpoint-", "checkpoint-1a", ".tmp-checkpoint-5", "checkpoint-5\n", "checkpoint-\u0665",
                 "checkpoint-" + "9" * 4301, "best"):
        assert parse_checkpoint_name(name) is None, name
    run = FakeRun(tmp_path / "run")
    run.checkpoint(5, 1.0)
    os.makedirs(os.path.join(run.output_dir, "checkpoint-" + "9" * 200))  # no int64 step: not the trainer's
    names = [c["name"] for c in make_client(run).get("/api/checkpoints").get_json()["checkpoints"]]
    assert names == ["checkpoint-5"]


def test_the_dashboard_never_imports_torch():
    code = ("import sys, glmkit.dashboard.cli, glmkit.run.checkpoint_names, glmkit.run.logs; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = run_cli(["-c", code])
    assert result.returncode == 0, result.stderr[-2000:]


# -- reader internals -------------------------------------------------------


def test_chunk_boundaries_long_lines_and_a_last_wanted_key(tmp_path):
    from glmkit.dashboard.logreader import JsonlTail, TableSink

    path = tmp_path / "training_log.jsonl"
    records = [{"time": 1.7e9 + i, "step": i, "lr": 1e-5 * (i % 7), "loss": 1.0 / (i + 1)} for i in range(400)]
    records[150]["note"] = "x" * 5000  # one line longer than a chunk
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    small = TableSink(("loss", "lr"), lazy=("lr",))
    JsonlTail(str(path), small, chunk_bytes=997).poll()  # odd size: lines straddle chunks
    assert len(small.table) == 400
    np.testing.assert_array_equal(small.table.column("step"), np.arange(400))
    np.testing.assert_array_equal(small.table.column("loss"), [r["loss"] for r in records])
    np.testing.assert_array_equal(small.table.column("lr"), [r["lr"] for r in records])


def test_lazy_columns_are_parsed_on_first_read(run):
    run.steps(1, 30)
    app = create_app(run.logs_dir, min_poll_interval=0)
    client = app.test_client()
    s = stats(client)
    table = app.extensions["glmkit_dashboard"].monitor.train.table
    lr = table._cols["lr"]
    assert lr._text_rows == 30 and s["lr"] is not None  # the card needed no full parse
    data = client.get("/api/series/lr").get_json()
    assert lr._text_rows == 0 and len(data["y"]) == 30


def test_a_long_expert_backlog_is_skipped_not_parsed(tmp_path):
    from glmkit.dashboard.experts import ExpertSink
    from glmkit.dashboard.logreader import JsonlTail

    run = FakeRun(tmp_path / "run")
    for step in range(0, 200, 10):
        run.experts(step)
    sink = ExpertSink()
    tail = JsonlTail(run.path("experts"), sink, max_backlog=5000)
    tail.poll()
    assert sink.current()["step"] == 190
    assert 0 < len(sink.table) < 20 and tail.bad_lines == 0 and tail.skipped_bytes > 0


def test_smoothing_cache_extends_and_restarts_after_a_resume(run):
    from glmkit.dashboard.series import SmoothingCache

    run.steps(1, 40)
    app = create_app(run.logs_dir, min_poll_interval=0)
    client = app.test_client()
    smoother = app.extensions["glmkit_dashboard"].smoother

    def check():
        data = client.get("/api/series/loss?smoothing=0.7").get_json()
        y, raw = np.array(data["y"], dtype=float), np.array(data["raw"], dtype=float)  # null -> NaN
        np.testing.assert_allclose(y, ema(raw, 0.7), rtol=1e-12)
        return data

    check()
    run.steps(41, 45)
    run.train(46, loss=float("nan"))  # non-finite values pass through the cached path too
    assert len(check()["x"]) == 46
    run.event("resume", 30, from_step=30, checkpoint="checkpoint-30")
    for step in range(31, 36):
        run.train(step, loss=0.5)
    assert check()["x"][-1] == 35
    assert len(smoother._entries) == 1

    values = np.random.default_rng(3).standard_normal(5000)
    cache = SmoothingCache()
    for end in (1, 7, 1000, 4999, 5000):
        out = cache.smoothed(("k",), 0, values[:end], 0.95)
    np.testing.assert_allclose(out, ema(values, 0.95), rtol=1e-10, atol=1e-12)
