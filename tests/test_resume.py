"""Crash safety: SIGKILL at several points, resume, and the run carries on as if uninterrupted."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import (
    ROOT,
    run_cli,
    shared_training_run,
    write_demo_corpus_in_fresh_process,
    write_shard,
    write_tiny_config,
)

from glmkit.run.logs import latest_per_step, read_jsonl

pytestmark = pytest.mark.trains  # every test here trains (make test-fast leaves them out)

# expert_stats_interval 3 does not divide checkpoint_interval 10: the open interval must survive a resume.
SETTINGS = {"training.max_steps": 24, "logging.eval_interval": 5, "checkpoint.interval": 10,
            "checkpoint.keep_top_k": 2, "logging.expert_stats_interval": 3}
# A run just long enough to leave one final checkpoint: what the refusal tests resume from.
SHORT = {"training.max_steps": 3, "logging.eval_interval": 3, "checkpoint.interval": 3}
# Everything a step computes, as opposed to wall-clock fields; compared to the bit.
DETERMINISTIC = {"training_log.jsonl": ("loss", "lr", "grad_norm", "tokens", "tokens_seen", "epoch"),
                 "eval_log.jsonl": ("val_loss", "perplexity", "val_tokens"),
                 "expert_usage_log.jsonl": ("interval_tokens", "layers")}


def curves(out_dir) -> dict:
    """{log file: {step: (deterministic fields)}}, latest record per step (the resume rule)."""
    found = {}
    for name, fields in DETERMINISTIC.items():
        records = latest_per_step(read_jsonl(os.path.join(out_dir, "logs", name)))
        found[name] = {r["step"]: tuple(r[f] for f in fields) for r in records}
    return found


def assert_same_run(out_dir, baseline):
    """Every record of every log equals the uninterrupted run's exactly: no tolerance on CPU."""
    resumed = curves(out_dir)
    for name, reference in baseline.items():
        assert sorted(resumed[name]) == sorted(reference), name  # no step missing or extra
        for step, values in reference.items():
            assert resumed[name][step] == values, (name, step, resumed[name][step], values)


def run_baseline(tmp, tiny_model_dir, demo_corpus, launch=()):
    config = write_tiny_config(tmp, tiny_model_dir, demo_corpus, SETTINGS)
    result = run_cli([*launch, "train_qlora.py", "--config", config])
    assert result.returncode == 0, result.stderr[-2000:]
    return curves(str(tmp / "run"))


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory, tiny_model_dir, demo_corpus):
    """The uninterrupted 24-step run every resumed run is compared with, trained once per session."""
    return shared_training_run(tmp_path_factory, "resume-baseline", tiny_model_dir, demo_corpus, SETTINGS)


@pytest.fixture(scope="session")
def short_run(tmp_path_factory, tiny_model_dir, demo_corpus):
    """A finished 3-step run (one final checkpoint), trained once per session and copied by each test."""
    return shared_training_run(tmp_path_factory, "resume-short", tiny_model_dir, demo_corpus, SHORT)


@pytest.fixture
def baseline(baseline_run):
    return curves(baseline_run.out)


def copy_of_finished_run(run, tmp_path, make_config, settings=SETTINGS) -> str:
    """A shared run's folders copied into tmp_path (the run, its best adapter, its data cache) and a config
    naming the copies: a finished run of this test's own, without training it again."""
    for name in ("run", "best", "scratch"):
        if os.path.isdir(run.folder / name):
            shutil.copytree(run.folder / name, tmp_path / name, symlinks=True)
    return make_config(settings)


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
    assert sorted(baseline["training_log.jsonl"]) == list(range(1, 25))
    assert_same_run(str(out), baseline)
    events = [e["event"] for e in read_jsonl(str(out / "logs" / "events_log.jsonl"))]
    assert events.count("resume") == 1 and events[-1] == "run_end"


TWO_PROCESSES = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no")


def test_two_process_sigkill_then_resume_matches_uninterrupted_run(tmp_path_factory, tiny_model_dir, demo_corpus):
    """Every process's RNG, the sharded data position and the folded expert counts survive a kill."""
    baseline2 = run_baseline(tmp_path_factory.mktemp("baseline2"), tiny_model_dir, demo_corpus, TWO_PROCESSES)
    tmp = tmp_path_factory.mktemp("killed2")
    config = write_tiny_config(tmp, tiny_model_dir, demo_corpus, SETTINGS)
    killed = run_cli([*TWO_PROCESSES, "train_qlora.py", "--config", config], env={"GLMKIT_FAULT_KILL_AT": "mid_step:13"})
    assert killed.returncode != 0
    assert sorted(os.listdir(tmp / "run")) == [".trainer.lock", "checkpoint-10", "logs"]  # the lock file stays; its flock died with the run
    resumed = run_cli([*TWO_PROCESSES, "train_qlora.py", "--config", config, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert os.path.isfile(tmp / "run" / "checkpoint-20" / "random_states_1.pkl")
    assert_same_run(str(tmp / "run"), baseline2)
    assert read_jsonl(str(tmp / "run" / "logs" / "events_log.jsonl"))[0]["world_size"] == 2


def test_failed_save_reports_path_and_cause_and_keeps_earlier_checkpoints(make_config, tmp_path, baseline):
    """The injected fault, for the resume afterwards; a real full disk is in tests/test_real_faults.py."""
    config = make_config(SETTINGS)
    failed = run_cli(["train_qlora.py", "--config", config], env={"GLMKIT_FAULT_DISK_FULL_AT": "checkpoint_write:20"})
    out = tmp_path / "run"
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: could not write checkpoint {out / 'checkpoint-20'}: no space left on device;")
    assert f"the latest complete checkpoint, {out / 'checkpoint-10'}, is intact" in message
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-10"]  # no half-written folder
    assert os.path.isfile(out / "checkpoint-10" / "COMPLETE")
    errors = read_jsonl(str(out / "logs" / "error_log.jsonl"))
    assert errors[-1]["type"] == "WriteFailed" and errors[-1]["step"] == 20
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume"])  # space freed: carry on from step 10
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(str(out), baseline)


def test_free_space_is_checked_before_writing(tmp_path):
    from glmkit.train.checkpoint import CheckpointError, check_free_space

    check_free_space(str(tmp_path), 1)
    with pytest.raises(CheckpointError, match=r"not enough disk space in .*: .* GiB free, a checkpoint needs about"):
        check_free_space(str(tmp_path), 2**62)


def test_finished_run_says_so(make_config, tmp_path, short_run):
    config = copy_of_finished_run(short_run, tmp_path, make_config, SHORT)
    again = run_cli(["train_qlora.py", "--config", config, "--resume"])
    assert again.returncode == 0 and "already finished" in again.stdout + again.stderr


def test_resume_refuses_critical_changes_and_lists_harmless_ones(make_config, tmp_path):
    config = make_config(SHORT)
    assert run_cli(["train_qlora.py", "--config", config]).returncode == 0
    refused = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "lora.r=4",
                       "--set", "training.max_seq_length=128"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "lora.r (8 -> 4)" in refused.stderr and "training.max_seq_length (256 -> 128)" in refused.stderr
    other_strategy = run_cli(["train_qlora.py", "--config", config, "--resume", "--set",
                              "distributed.accelerate_config=fsdp"])
    assert other_strategy.returncode == 2 and other_strategy.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot resume {tmp_path / 'run' / 'final-checkpoint-3'} with distributed.accelerate_config fsdp: "
        f"it was written by a ddp run")
    allowed = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=4",
                       "--set", "logging.log_interval=2"])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "changed settings (allowed): logging.log_interval, training.max_steps" in allowed.stdout + allowed.stderr


def test_fresh_start_over_an_existing_run_is_refused(make_config, tmp_path, short_run):
    config = copy_of_finished_run(short_run, tmp_path, make_config, SHORT)
    again = run_cli(["train_qlora.py", "--config", config])
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_resume_from_a_given_checkpoint(make_config, tmp_path, baseline, baseline_run):
    config = copy_of_finished_run(baseline_run, tmp_path, make_config)
    out = tmp_path / "run"
    again = run_cli(["train_qlora.py", "--config", config, "--resume_from", str(out / "checkpoint-10")])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-10'}" in again.stdout + again.stderr
    resume = [e for e in read_jsonl(str(out / "logs" / "events_log.jsonl")) if e["event"] == "resume"]
    assert [(e["from_step"], e["checkpoint"]) for e in resume] == [(10, str(out / "checkpoint-10"))]
    assert_same_run(str(out), baseline)  # steps 11-24 written twice; the latest records equal the first ones
    wrong = run_cli(["train_qlora.py", "--config", config, "--resume_from", str(out / "logs")])
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert f"--resume_from {out / 'logs'}: not a complete checkpoint" in wrong.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_and_exits_cleanly(signum, make_config, tmp_path):
    config = make_config({"training.max_steps": 400, "logging.eval_interval": 100, "checkpoint.interval": 200})
    log = tmp_path / "run" / "logs" / "training_log.jsonl"
    proc = subprocess.Popen([sys.executable, "train_qlora.py", "--config", config], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_jsonl(str(log))) < 3:
        time.sleep(0.2)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-2000:]
    assert "continue with ./launch_training.sh" in output
    events = read_jsonl(str(tmp_path / "run" / "logs" / "events_log.jsonl"))
    step = events[-1]["step"]
    assert [e["event"] for e in events[-2:]] == ["preempted", "run_end"] and events[-1]["status"] == "preempted"
    assert events[-2]["signal"] == signal.Signals(signum).name
    assert os.path.isfile(tmp_path / "run" / f"checkpoint-{step}" / "COMPLETE")


def test_non_finite_steps_are_skipped_then_abort(make_config, tmp_path):
    config = make_config({"training.max_steps": 6, "training.max_nan_skips": 2, "logging.eval_interval": 3,
                          "checkpoint.interval": 6})
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
    assert errors[-1]["type"] == "FloatingPointError" and errors[-1]["step"] == 3  # the step whose loss was the last straw


def test_resume_across_an_epoch_boundary(tmp_path_factory, tiny_model_dir):
    """A small corpus (21 steps per epoch): resume at step 15, cross into epoch 2's reshuffle, match to the bit."""
    corpus = str(tmp_path_factory.mktemp("small") / "small.jsonl")
    write_demo_corpus_in_fresh_process(corpus, max_docs=40)
    settings = {"training.max_steps": None, "training.epochs": 2, "logging.eval_interval": 5,
                "checkpoint.interval": 15, "logging.expert_stats_interval": 5}
    reference_dir = tmp_path_factory.mktemp("epochs-baseline")
    config = write_tiny_config(reference_dir, tiny_model_dir, corpus, settings)
    assert run_cli(["train_qlora.py", "--config", config]).returncode == 0
    reference = curves(str(reference_dir / "run"))
    assert [epoch for *_, epoch in reference["training_log.jsonl"].values()][20:22] == [1.0, 22 / 21]
    tmp = tmp_path_factory.mktemp("epochs-killed")
    config = write_tiny_config(tmp, tiny_model_dir, corpus, settings)
    killed = run_cli(["train_qlora.py", "--config", config], env={"GLMKIT_FAULT_KILL_AT": "mid_step:23"})
    assert killed.returncode == -signal.SIGKILL
    assert run_cli(["train_qlora.py", "--config", config, "--resume"]).returncode == 0
    assert_same_run(str(tmp / "run"), reference)


def test_output_dir_not_shared_by_every_process_is_refused(make_config, tmp_path):
    """Node-local output folders would lose the other nodes' checkpoint parts: refuse before training."""
    config = make_config({"training.max_steps": 2})
    result = run_cli([*TWO_PROCESSES, "train_qlora.py", "--config", config], env={"GLMKIT_FAULT_UNSHARED_OUTPUT": "1"})
    assert result.returncode != 0
    assert (f"paths.output_dir {tmp_path / 'run'} is not the same folder for every process: 1 of 2 cannot see"
            in result.stderr)
    assert "train_qlora.py\", line" not in result.stderr  # a one-line error, not a traceback through the trainer
    assert read_jsonl(str(tmp_path / "run" / "logs" / "training_log.jsonl")) == []  # refused before any step
    assert read_jsonl(str(tmp_path / "run" / "logs" / "error_log.jsonl"))[-1]["type"] == "ResumeError"


def test_changed_hyperparameters_take_effect_from_the_first_resumed_step(make_config, tmp_path, tiny_model_dir,
                                                                         demo_corpus, baseline_run):
    """An allowed change is applied, not just listed: the resumed LR equals a fresh run's at the same steps."""
    import torch

    (tmp_path / "fresh").mkdir()
    fresh_cfg = write_tiny_config(tmp_path / "fresh", tiny_model_dir, demo_corpus,
                                  {**SETTINGS, "optimization.learning_rate": 1e-3, "optimization.weight_decay": 0.01})
    assert run_cli(["train_qlora.py", "--config", fresh_cfg]).returncode == 0
    config = copy_of_finished_run(baseline_run, tmp_path, make_config)
    for later in ("checkpoint-20", "final-checkpoint-24"):  # as if killed after checkpoint-10
        shutil.rmtree(tmp_path / "run" / later)
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "optimization.learning_rate=1e-3",
                       "--set", "optimization.weight_decay=0.01"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lr_of = lambda out: {r["step"]: r["lr"] for r in latest_per_step(read_jsonl(str(out / "logs" / "training_log.jsonl")))}  # noqa: E731
    fresh, mine = lr_of(tmp_path / "fresh" / "run"), lr_of(tmp_path / "run")
    assert all(mine[s] == fresh[s] for s in range(11, 25)), [(s, mine[s], fresh[s]) for s in range(11, 25)]
    assert mine[10] != fresh[10]  # before the resume the old peak LR was in force
    groups = torch.load(str(tmp_path / "run" / "checkpoint-20" / "optimizer.bin"), weights_only=False)["param_groups"]
    assert groups[0]["weight_decay"] == 0.01 and groups[0]["initial_lr"] == 1e-3


def test_a_second_trainer_on_the_same_output_dir_is_refused_and_a_killed_one_never_blocks(make_config, tmp_path):
    config = make_config({"training.max_steps": 400, "logging.eval_interval": 100, "checkpoint.interval": 200})
    first = subprocess.Popen([sys.executable, "train_qlora.py", "--config", config], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = tmp_path / "run" / "logs" / "training_log.jsonl"
        deadline = time.time() + 300
        while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
            time.sleep(0.5)
        assert first.poll() is None, "the first trainer ended early"
        second = run_cli(["train_qlora.py", "--config", config, "--resume"])
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by another trainer (pid {first.pid} on " in second.stderr.strip().splitlines()[-1]
        lines_before = len(log.read_text().splitlines())
    finally:
        first.kill()
        first.wait()
    assert len(log.read_text().splitlines()) >= lines_before  # the refused trainer wrote no records of its own
    after_kill = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=2"])
    assert after_kill.returncode == 0, after_kill.stderr[-2000:]


def _damage(path, how: str) -> None:
    if how == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    elif how == "delete":
        os.remove(path)
    else:
        with open(path, "w") as fh:
            fh.write("model: [unclosed\n")


def test_resume_skips_damaged_checkpoints_and_says_which(make_config, tmp_path, baseline_run):
    config = copy_of_finished_run(baseline_run, tmp_path, make_config)
    out = tmp_path / "run"
    _damage(out / "final-checkpoint-24" / "adapter_model.safetensors", "truncate")
    _damage(out / "checkpoint-20" / "trainer_meta.json", "delete")
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=26"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    text = resumed.stdout + resumed.stderr
    assert f"warning: skipping damaged checkpoint {out / 'final-checkpoint-24'}: adapter_model.safetensors has" in text
    assert f"warning: skipping damaged checkpoint {out / 'checkpoint-20'}: trainer_meta.json is missing" in text
    resume = [e for e in read_jsonl(str(out / "logs" / "events_log.jsonl")) if e["event"] == "resume"]
    assert [(e["from_step"], e["checkpoint"]) for e in resume] == [(10, str(out / "checkpoint-10"))]


@pytest.mark.parametrize("victim, how, says", [
    ("adapter_model.safetensors", "truncate", "adapter_model.safetensors has"),
    ("trainer_meta.json", "delete", "trainer_meta.json is missing"),
    ("training_config.resolved.yaml", "corrupt", "training_config.resolved.yaml has"),
])
def test_resume_from_a_damaged_checkpoint_is_one_line_before_the_model_loads(make_config, tmp_path, victim, how, says,
                                                                             short_run):
    config = copy_of_finished_run(short_run, tmp_path, make_config, SHORT)
    target = tmp_path / "run" / "final-checkpoint-3"
    _damage(target / victim, how)
    starts = len(read_jsonl(str(tmp_path / "run" / "logs" / "events_log.jsonl")))
    result = run_cli(["train_qlora.py", "--config", config, "--resume_from", str(target)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --resume_from {target}: the checkpoint is damaged (") and says in last
    assert len(read_jsonl(str(tmp_path / "run" / "logs" / "events_log.jsonl"))) == starts  # no run_start: nothing loaded


def test_every_checkpoint_damaged_is_one_line_that_says_so(make_config, tmp_path, short_run):
    """A power cut's image (zeros at the files' full size) in every checkpoint: --resume used to print a warning
    per checkpoint, then "no complete checkpoint ...; starting from step 0", then refuse to start over them."""
    config = copy_of_finished_run(short_run, tmp_path, make_config, SHORT)
    out = tmp_path / "run"
    damaged = sorted(n for n in os.listdir(out) if "checkpoint-" in n)
    assert damaged == ["final-checkpoint-3"]  # the last step is saved once, as the final checkpoint
    for name in damaged:
        weights = out / name / "adapter_model.safetensors"
        size = os.path.getsize(weights)
        with open(weights, "r+b") as fh:
            fh.seek(size // 3)
            fh.write(b"\0" * (size // 3))
    result = run_cli(["train_qlora.py", "--config", config, "--resume"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    said = (result.stdout + result.stderr).strip().splitlines()
    assert said[-1] == (f"error: --resume: every checkpoint in {out} is damaged (the only one, "
                        f"{out / 'final-checkpoint-3'}: adapter_model.safetensors does not match its checksum (its "
                        f"content changed after it was written)), so there is nothing to continue from; restore one "
                        f"from a copy, or start a new run in another paths.output_dir")
    assert not [line for line in said if "starting from step 0" in line or "already holds checkpoints" in line
                or line.startswith("warning: skipping")]
    assert sorted(n for n in os.listdir(out) if "checkpoint-" in n) == damaged  # nothing removed


def test_ctrl_c_at_the_last_step_finishes_the_run(make_config, tmp_path):
    """A real SIGINT in the middle of the last step: the run used to save checkpoint-3 and end "preempted", and
    the relaunch said "already finished", so it stayed preempted for good. Now it finishes there and then."""
    config = make_config(SHORT)
    result = run_cli(["train_qlora.py", "--config", config], env={"GLMKIT_FAULT_KILL_AT": "mid_step:3:SIGINT"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SIGINT at the last step: finishing the run" in result.stdout
    events = read_jsonl(str(tmp_path / "run" / "logs" / "events_log.jsonl"))
    assert "preempted" not in [e["event"] for e in events]
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "finished"
    assert events[-1]["final_checkpoint"] == str(tmp_path / "run" / "final-checkpoint-3")
    again = run_cli(["train_qlora.py", "--config", config, "--resume"])
    assert again.returncode == 0 and "already finished" in again.stdout + again.stderr


def test_a_run_stopped_before_its_final_save_is_finished_by_the_relaunch(make_config, tmp_path, short_run):
    """What the last-step Ctrl-C used to leave (checkpoint-3 of 3, no final checkpoint, run_end "preempted"):
    the relaunch writes the final checkpoint and ends the run as finished instead of saying it already was."""
    config = copy_of_finished_run(short_run, tmp_path, make_config, SHORT)
    out = tmp_path / "run"
    # Step 3's checkpoint as a periodic one (today the last step is saved once, as the final checkpoint).
    from glmkit.run.checkpoint_names import META
    from glmkit.train.checkpoint import RESOLVED_CONFIG, finalize

    os.rename(out / "final-checkpoint-3", out / ".tmp-checkpoint-3")
    meta = {**json.load(open(out / ".tmp-checkpoint-3" / META)), "final": False}
    os.remove(out / ".tmp-checkpoint-3" / "COMPLETE")
    finalize(str(out / ".tmp-checkpoint-3"), str(out / "checkpoint-3"), meta,
             yaml.safe_load(open(out / ".tmp-checkpoint-3" / RESOLVED_CONFIG)))
    with open(out / "logs" / "events_log.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": 3, "time": time.time(), "event": "preempted", "signal": "SIGINT"}) + "\n")
        fh.write(json.dumps({"step": 3, "time": time.time(), "event": "run_end", "status": "preempted",
                             "final_checkpoint": None}) + "\n")
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "already finished" not in resumed.stdout + resumed.stderr
    from glmkit.train.checkpoint import verify

    assert verify(str(out / "final-checkpoint-3")) is None
    events = read_jsonl(str(out / "logs" / "events_log.jsonl"))
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "finished"
    training = read_jsonl(str(out / "logs" / "training_log.jsonl"))
    assert [r["step"] for r in training] == [1, 2, 3]  # nothing trained again


def test_best_adapter_dir_holding_foreign_files_is_never_replaced(make_config, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("not the kit's")
    config = make_config({"training.max_steps": 3, "logging.eval_interval": 3, "checkpoint.interval": 3,
                          "paths.best_adapter_dir": str(precious)})
    result = run_cli(["train_qlora.py", "--config", config])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds files the kit did not write" in result.stderr.strip().splitlines()[-1]
    assert (precious / "notes.txt").read_text() == "not the kit's" and os.listdir(precious) == ["notes.txt"]


def write_sharded_corpus(folder, demo_corpus) -> list[dict]:
    """The demo documents as a folder of .jsonl / .jsonl.gz / .parquet shards plus a .jsonl.zst replay source."""
    with open(demo_corpus, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    write_shard(folder / "corpus" / "a.jsonl", texts[:150])
    write_shard(folder / "corpus" / "b.jsonl.gz", texts[150:280])
    write_shard(folder / "corpus" / "c.parquet", texts[280:360])
    replay = write_shard(folder / "replay.jsonl.zst", texts[360:400])
    return [{"path": str(folder / "corpus"), "weight": 1}, {"path": replay, "weight": 1.5}]


def test_sharded_weighted_corpus_resumes_to_the_bit(tmp_path_factory, tiny_model_dir, demo_corpus):
    data = write_sharded_corpus(tmp_path_factory.mktemp("shards"), demo_corpus)
    settings = {"training.max_steps": 14, "logging.eval_interval": 5, "checkpoint.interval": 10,
                "logging.expert_stats_interval": 3}
    reference_dir = tmp_path_factory.mktemp("sharded-baseline")
    config = write_tiny_config(reference_dir, tiny_model_dir, data, settings)
    assert run_cli(["train_qlora.py", "--config", config]).returncode == 0
    reference = curves(str(reference_dir / "run"))
    tmp = tmp_path_factory.mktemp("sharded-killed")
    config = write_tiny_config(tmp, tiny_model_dir, data, settings)
    killed = run_cli(["train_qlora.py", "--config", config], env={"GLMKIT_FAULT_KILL_AT": "mid_step:12"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(the cache was warm)" in resumed.stdout and "data: tokenized" not in resumed.stderr  # nothing re-read
    assert_same_run(str(tmp / "run"), reference)


def test_resume_over_changed_data_is_refused_unless_allowed(tmp_path, tiny_model_dir, demo_corpus):
    from glmkit.train.checkpoint import read_meta

    data = write_sharded_corpus(tmp_path / "data", demo_corpus)
    config = write_tiny_config(tmp_path, tiny_model_dir, data, {"training.max_steps": 3, "logging.eval_interval": 3,
                                                                 "checkpoint.interval": 3})
    assert run_cli(["train_qlora.py", "--config", config]).returncode == 0
    checkpoint = str(tmp_path / "run" / "final-checkpoint-3")
    assert len(read_meta(checkpoint)["data_fingerprint"]["sources"][0]["files"]) == 3
    # The same files named another way are the same data: not a change, not even a listed one.
    same = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=4",
                    "--set", f"paths.data_path=[{{path: '{tmp_path / 'data' / 'corpus' / '*'}'}}, "
                             f"{{path: '{data[1]['path']}', weight: 1.5}}]"])
    assert same.returncode == 0, same.stderr[-2000:]
    assert "paths.data_path" not in same.stdout + same.stderr
    added = write_shard(tmp_path / "data" / "corpus" / "d.jsonl", ["a new document about something " * 20] * 30)
    refused = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=5"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    newest = str(tmp_path / "run" / "final-checkpoint-4")
    assert line.startswith(f"error: cannot resume {newest}: the data of paths.data_path changed since it was saved: "
                           f"{added} added")
    assert "--allow-data-change" in line
    allowed = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=5",
                       "--allow-data-change"])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    events = read_jsonl(str(tmp_path / "run" / "logs" / "events_log.jsonl"))
    changed = [e for e in events if e["event"] == "data_changed"]
    assert len(changed) == 1 and changed[0]["checkpoint"] == newest and changed[0]["step"] == 4
    assert f"{added} added" in changed[0]["changes"] and changed[0]["allowed_by"] == "--allow-data-change"
    fingerprint = read_meta(str(tmp_path / "run" / "final-checkpoint-5"))["data_fingerprint"]
    assert len(fingerprint["sources"][0]["files"]) == 4  # the new checkpoint records the data it trained on
    write_shard(added, ["a rewritten document " * 50] * 10)  # same name, other content
    rewritten = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=6"])
    assert rewritten.returncode == 2 and f"{added} size " in rewritten.stderr.strip().splitlines()[-1]
