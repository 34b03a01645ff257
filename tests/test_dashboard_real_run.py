"""The dashboard against the real trainer: a tiny run is SIGKILLed, shows as stalled, is resumed, and the
page (headless Chromium) and the API then show one curve that equals the trainer's own logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, run_cli, wait_for_plots

from glmkit.run.logs import LOG_FILES, latest_per_step, read_jsonl

pytestmark = pytest.mark.trains  # every test here trains (make test-fast leaves them out)

SETTINGS = {"training.max_steps": 16, "logging.eval_interval": 4, "checkpoint.interval": 8,
            "logging.expert_stats_interval": 4, "checkpoint.keep_top_k": 1}


def api(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as response:
        return json.load(response)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_then_resumed_run_reads_true_in_browser(make_config, tmp_path, serve_dashboard, chromium):
    config = make_config(SETTINGS)
    out = tmp_path / "run"
    killed = run_cli(["train_qlora.py", "--config", config], env={"GLMKIT_FAULT_KILL_AT": "mid_step:11"})
    assert killed.returncode < 0

    url = serve_dashboard(out / "logs", out, extra_args=("--stall-seconds", "1")).url
    page = chromium()
    errors = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.goto(url + "/")
    # A SIGKILLed trainer writes nothing more: the page must say so rather than "running". "Stalled" means
    # silent for 10 x the step time, which is long on a busy machine.
    seconds_per_step = api(url, "/api/stats")["seconds_per_step"] or 1.0
    page.wait_for_function("() => document.getElementById('status').textContent.trim() === 'stalled'",
                           timeout=int((30 + 12 * seconds_per_step) * 1000))
    assert page.text_content("#stat-step").strip() == "10"

    # Resume while the page is open; it follows the run to its end by itself.
    resumed = subprocess.Popen([sys.executable, "train_qlora.py", "--config", config, "--resume"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-2000:]
    page.wait_for_function("() => document.getElementById('status').textContent.trim() === 'finished'",
                           timeout=30_000)
    assert page.text_content("#stat-step").strip() == "16"
    assert page.text_content("#stat-tokens").strip().endswith("tokens seen")
    wait_for_plots(page)
    timeline = page.text_content("#timeline").lower()
    assert "resume" in timeline
    best_row = page.locator("#ckpt-rows tr.best")
    assert best_row.count() == 1

    # The numbers behind the page equal the trainer's logs under the resume rule.
    train = latest_per_step(read_jsonl(str(out / "logs" / LOG_FILES["train"])))
    series = wait_for(lambda: (s := api(url, "/api/series/loss?smoothing=0")) and len(s["x"]) == 16 and s,
                      what="16 loss points")
    assert series["x"] == list(range(1, 17))
    assert series["y"] == [r["loss"] for r in train]
    evals = read_jsonl(str(out / "logs" / LOG_FILES["eval"]))
    stats = api(url, "/api/stats")
    assert stats["step"] == stats["total_steps"] == 16 and stats["loss"] == train[-1]["loss"]
    # "tokens seen": the trainer's cumulative count, or (a trainer that predates it) the sum over steps.
    expected_seen = train[-1].get("tokens_seen", sum(r["tokens"] for r in train))
    assert stats["tokens_seen"] == expected_seen and stats["tokens_seen_estimated"] == ("tokens_seen" not in train[-1])
    assert stats["best_val_loss"] == min(e["val_loss"] for e in evals if e["step"] > 0)  # step 0 is the baseline
    checkpoints = api(url, "/api/checkpoints")
    names = {c["name"] for c in checkpoints["checkpoints"]}
    assert names == {n for n in os.listdir(out) if "checkpoint" in n}
    best = checkpoints["best"]
    assert best["step"] == stats["best_val_step"] and best["name"] in best_row.text_content()
    assert not errors, errors
