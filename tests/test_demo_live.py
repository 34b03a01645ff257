"""`make demo` (python -m glmkit.demo.live): the dashboard answers while the demo trains, and Ctrl-C stops both."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, free_port, write_tiny_config

pytestmark = pytest.mark.trains  # every test here trains (make test-fast leaves them out)

SETTINGS = {"training.max_steps": 12, "logging.eval_interval": 6, "checkpoint.interval": 6,
            "logging.expert_stats_interval": 3}


def start_demo(config: str, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "glmkit.demo.live", "--config", config, "--port", str(port),
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job


def stats(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def wait_for_training(port: int, demo: subprocess.Popen, min_step: int, timeout: float = 300) -> dict:
    """The dashboard's /api/stats once it shows a running run at min_step or later (the demo still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert demo.poll() is None, "the demo ended before its dashboard showed it training"
        seen = stats(port)
        if seen and seen.get("status") == "running" and (seen.get("step") or 0) >= min_step:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"the dashboard never showed step {min_step} while the demo trained")


def test_the_dashboard_answers_while_the_demo_trains(tmp_path, tiny_model_dir, demo_corpus):
    config = write_tiny_config(tmp_path, tiny_model_dir, demo_corpus, SETTINGS)
    port = free_port()
    demo = start_demo(config, port, "--exit-after-training")
    try:
        first = demo.stdout.readline()
        assert first.startswith(f"[demo] dashboard: http://127.0.0.1:{port}"), first  # before any training line
        during = wait_for_training(port, demo, min_step=1)
        assert during["step"] < SETTINGS["training.max_steps"]  # seen mid-run, not after it
        output = first + demo.stdout.read()
        assert demo.wait(timeout=600) == 0, output[-3000:]
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert "done: 12 steps in" in output and "eval at step 6" in output
    assert stats(port) is None  # --exit-after-training: the dashboard stopped with the run


def test_ctrl_c_stops_the_trainer_with_a_checkpoint_and_the_dashboard(tmp_path, tiny_model_dir, demo_corpus):
    config = write_tiny_config(tmp_path, tiny_model_dir, demo_corpus, {**SETTINGS, "training.max_steps": 400})
    port = free_port()
    demo = start_demo(config, port)
    try:
        demo.stdout.readline()
        wait_for_training(port, demo, min_step=2)
        os.killpg(demo.pid, signal.SIGINT)  # what a terminal sends its foreground process group on Ctrl-C
        output = demo.stdout.read()
        assert demo.wait(timeout=300) == 130, output[-3000:]
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    # the launcher hands the terminal's SIGINT to the ranks as SIGTERM (torch elastic); either is a preemption
    assert re.search(r"preempted by SIG(INT|TERM): saved step \d+", output) and "[demo] Ctrl-C" in output
    assert any(name.startswith("checkpoint-") for name in os.listdir(tmp_path / "run"))  # make demo resumes it
    assert stats(port) is None  # and the dashboard is gone too
