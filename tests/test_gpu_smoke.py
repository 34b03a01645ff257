"""bench/gpu_smoke.sh runs end to end without a GPU in its dry mode, so it is known to work before one is lent."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.trains  # every test here trains (make test-fast leaves them out)


def test_gpu_smoke_dry_run_on_cpu(tmp_path, demo_corpus):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: run bench/gpu_smoke.sh itself")
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHON": sys.executable, "DRY": "1", "STEPS": "2", "SKIP": "0", "REPS": "1",
           "OUT": str(out), "MID_DIR": str(tmp_path / "mid"), "WORK": str(tmp_path / "work"),
           # whole steps on the session's corpus: the full demo corpus would be tokenized for them
           "DATA": demo_corpus,
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(["bash", "bench/gpu_smoke.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    layers = runs["layers"]
    for part in ("attention_sdpa", "attention_varlen", "moe_block", "experts_dequantize", "loss_full", "loss_chunked"):
        assert layers[part]["seconds"]["median"] > 0, part
    assert layers["segments"] >= 2 and layers["experts_implementation"] == "grouped_mm"
    varlen, sdpa = runs["step_varlen"], runs["step_sdpa"]
    assert varlen["steps_logged"] == sdpa["steps_logged"] == 2
    assert varlen["median_tokens_per_sec"] > 0 and sdpa["median_tokens_per_sec"] > 0
    assert abs(varlen["final_loss"] - sdpa["final_loss"]) <= 1e-5 * abs(sdpa["final_loss"])  # same training
    fit = runs["fit"]
    assert fit["predicted_max_micro_batch"] >= 1 and fit["measured_max_micro_batch"] == "unmeasured (no GPU)"
    assert fit["probes"]["1"]["ran"] is True
    assert not (tmp_path / "mid").exists() and not (tmp_path / "work").exists()  # cleaned up
