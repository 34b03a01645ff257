"""Crash safety: SIGKILL at several points, resume, and the run carries on as if uninterrupted."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli, write_tiny_config
from glmkit.logs import latest_per_step, read_jsonl

SETTINGS = {"training.max_steps": 24, "logging.eval_interval": 5, "logging.checkpoint_interval": 10,
            "logging.keep_top_k": 2}
# On CPU the resumed losses agree with the uninterrupted run to ~2e-6 (see README, "Resume rule").
LOSS_TOLERANCE = 5e-6


def curve(out_dir):
    return latest_per_step(read_jsonl(os.path.join(out_dir, "logs", "training_log.jsonl")))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir, demo_corpus):
    tmp = tmp_path_factory.mktemp("baseline")
    config = write_tiny_config(tmp, tiny_model_dir, demo_corpus, SETTINGS)
    result = run_cli(["train_qlora.py", "--config", config])
    assert result.returncode == 0, result.stderr[-2000:]
    return curve(str(tmp / "run"))


@pytest.mark.parametrize("kill_at", ["mid_step:13", "after_eval:15", "checkpoint_write:20"])
def test_sigkill_then_resume_matches_uninterrupted_run(kill_at, baseline, make_config, tmp_path):
    config = make_config(SETTINGS)
    killed = run_cli(["train_qlora.py", "--config", config], env={"GLMKIT_FAULT_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL
    out = tmp_path / "run"
    if kill_at.startswith("checkpoint_write"):
        assert os.path.isdir(out / ".tmp-checkpoint-20") and not os.path.exists(out / "checkpoint-20")
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert not os.path.exists(out / ".tmp-checkpoint-20")  # the half-written folder was cleaned up
    after = curve(str(out))
    assert [r["step"] for r in after] == list(range(1, 25))
    for ours, reference in zip(after, baseline):
        assert ours["lr"] == reference["lr"], ours["step"]
        assert ours["tokens"] == reference["tokens"]
        assert abs(ours["loss"] - reference["loss"]) <= LOSS_TOLERANCE, (ours["step"], ours["loss"], reference["loss"])
    events = [e["event"] for e in read_jsonl(str(out / "logs" / "events_log.jsonl"))]
    assert events.count("resume") == 1 and events[-1] == "run_end"


def test_finished_run_says_so(make_config):
    config = make_config({"training.max_steps": 3, "logging.eval_interval": 3, "logging.checkpoint_interval": 3})
    assert run_cli(["train_qlora.py", "--config", config]).returncode == 0
    again = run_cli(["train_qlora.py", "--config", config, "--resume"])
    assert again.returncode == 0 and "already finished" in again.stdout + again.stderr


def test_resume_refuses_critical_changes_and_lists_harmless_ones(make_config, tmp_path):
    base = {"training.max_steps": 3, "logging.eval_interval": 3, "logging.checkpoint_interval": 3}
    config = make_config(base)
    assert run_cli(["train_qlora.py", "--config", config]).returncode == 0
    refused = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "lora.r=4",
                       "--set", "training.max_seq_length=128"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "lora.r (8 -> 4)" in refused.stderr and "training.max_seq_length (256 -> 128)" in refused.stderr
    allowed = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=4",
                       "--set", "logging.log_interval=2"])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "changed settings (allowed): logging.log_interval, training.max_steps" in allowed.stdout + allowed.stderr


def test_fresh_start_over_an_existing_run_is_refused(make_config):
    config = make_config({"training.max_steps": 3, "logging.eval_interval": 3, "logging.checkpoint_interval": 3})
    assert run_cli(["train_qlora.py", "--config", config]).returncode == 0
    again = run_cli(["train_qlora.py", "--config", config])
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_sigterm_saves_and_exits_cleanly(make_config, tmp_path):
    config = make_config({"training.max_steps": 400, "logging.eval_interval": 100, "logging.checkpoint_interval": 200})
    log = tmp_path / "run" / "logs" / "training_log.jsonl"
    proc = subprocess.Popen([sys.executable, "train_qlora.py", "--config", config], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_jsonl(str(log))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-2000:]
    assert "continue with ./launch_training.sh" in output
    events = read_jsonl(str(tmp_path / "run" / "logs" / "events_log.jsonl"))
    step = events[-1]["step"]
    assert [e["event"] for e in events[-2:]] == ["preempted", "run_end"] and events[-1]["status"] == "preempted"
    assert os.path.isfile(tmp_path / "run" / f"checkpoint-{step}" / "COMPLETE")


def test_non_finite_steps_are_skipped_then_abort(make_config, tmp_path):
    config = make_config({"training.max_steps": 6, "training.max_nan_skips": 2, "logging.eval_interval": 3,
                          "logging.checkpoint_interval": 6})
    ok = run_cli(["train_qlora.py", "--config", config], env={"GLMKIT_FAULT_NAN_STEPS": "2"})
    assert ok.returncode == 0, ok.stderr[-2000:]
    skipped = [e for e in read_jsonl(str(tmp_path / "run" / "logs" / "events_log.jsonl")) if e["event"] == "nan_skipped"]
    assert [(e["step"], e["consecutive"]) for e in skipped] == [(2, 1)]
    config2 = make_config({"training.max_steps": 6, "training.max_nan_skips": 2, "paths.output_dir": str(tmp_path / "run2")},
                          name="c2.yaml")
    aborted = run_cli(["train_qlora.py", "--config", config2], env={"GLMKIT_FAULT_NAN_STEPS": "2,3"})
    assert aborted.returncode == 2 and "2 consecutive steps had a non-finite loss" in aborted.stderr
    errors = read_jsonl(str(tmp_path / "run2" / "logs" / "error_log.jsonl"))
    # `step` in an error record is the last completed optimizer step
    assert errors[-1]["type"] == "FloatingPointError" and errors[-1]["step"] == 2
