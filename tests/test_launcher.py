"""launch_training.sh and its helper: values from the YAML, auto-resume, refusals, the accelerate
command it builds (dry runs), shellcheck, trainer refusals passed through without a launcher traceback,
and one real 2-process CPU run that resumes by itself."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import free_port

from glmkit.config.load import load_config
from glmkit.launch.env import format_lines, launch_values

KIT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(KIT_ROOT, "launch_training.sh")
SLURM_EXAMPLE = os.path.join(KIT_ROOT, "examples", "slurm_multinode.sbatch")
# Variables the launcher reads from the environment; tests set them explicitly or not at all.
LAUNCHER_ENV = ("NUM_MACHINES", "MACHINE_RANK", "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT", "SLURM_NODEID",
                "HF_HOME", "TMPDIR", "OMP_NUM_THREADS", "ACCELERATE_USE_CPU", "PYTHON")
NO_GPU = not __import__("torch").cuda.is_available()


def write_model_config(model_dir) -> None:
    """A config.json for a very small GLM-4.5-Air-shaped model: enough for the helper and the plan."""
    from transformers import Glm4MoeConfig

    Glm4MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  n_routed_experts=4, num_experts_per_tok=2, attention_bias=True).save_pretrained(str(model_dir))


@pytest.fixture
def kit(tmp_path):
    """A config whose model dir has a config.json and whose data file exists; returns a dict of paths."""
    root = tmp_path / "kit dir"  # a space in every path, on purpose
    model_dir, data = root / "model", root / "data" / "train.jsonl"
    model_dir.mkdir(parents=True)
    write_model_config(model_dir)
    data.parent.mkdir()
    data.write_text('{"text": "hello"}\n', encoding="utf-8")
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {"model_dir": "model", "data_path": "data/train.jsonl", "output_dir": "out",
                  "best_adapter_dir": "best", "scratch_dir": "scratch"},
        "training": {"max_seq_length": 64},
        "distributed": {"num_processes": 1},
    }), encoding="utf-8")
    return {"root": root, "config": str(config), "model_dir": str(model_dir), "data": str(data),
            "output_dir": str(root / "out"), "scratch": str(root / "scratch")}


def launcher_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(extra)
    return env


def run_launcher(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", LAUNCHER, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or launcher_env(), cwd=KIT_ROOT)


def command_line(result) -> list[str]:
    """The accelerate command a dry run printed, split back into its arguments."""
    for line in result.stdout.splitlines():
        if line.startswith("[launch] command: "):
            return shlex.split(line[len("[launch] command: "):])
    raise AssertionError(f"no command line in:\n{result.stdout}\n{result.stderr}")


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def make_checkpoint(output_dir: str, name: str, complete: bool) -> str:
    path = os.path.join(output_dir, name)
    os.makedirs(path)
    if complete:
        open(os.path.join(path, "COMPLETE"), "w").close()
    return path


# ---------------------------------------------------------------------------
# The helper
# ---------------------------------------------------------------------------

def test_launch_env_values_survive_eval(kit):
    odd = os.path.join(str(kit["root"]), "it's \"odd\" $HOME")
    script = 'eval "$("$0" -m glmkit.launch.env --config "$1" --set "$2")"; ' \
             'printf "%s\\n" "$KIT_OUTPUT_DIR" "$KIT_LOGS_DIR" "$KIT_MODEL_DIR" "$KIT_DATA_PATH" ' \
             '"$KIT_SCRATCH_DIR" "$KIT_NUM_PROCESSES" "$KIT_STRATEGY" "$KIT_ACCELERATE_CONFIG" "$KIT_LATEST_CHECKPOINT"'
    out = subprocess.run(["bash", "-c", script, sys.executable, kit["config"], f"paths.output_dir={odd}"],
                         capture_output=True, text=True, check=True, cwd=KIT_ROOT).stdout.split("\n")
    assert out[:9] == [odd, os.path.join(odd, "logs"), kit["model_dir"], kit["data"], kit["scratch"],
                       "1", "ddp", "", ""]


def test_launch_env_named_accelerate_config(kit):
    cfg = load_config(kit["config"], ["distributed.accelerate_config=fsdp", "distributed.num_processes=null"])
    values = launch_values(cfg)
    assert values["KIT_ACCELERATE_CONFIG"] == os.path.join(KIT_ROOT, "configs", "accelerate", "fsdp.yaml")
    assert values["KIT_STRATEGY"] == "fsdp"
    assert values["KIT_NUM_PROCESSES"] == ""  # null: one per visible GPU
    assert all(line.count("=") >= 1 for line in format_lines(values).splitlines())


# fsdp is MULTI_GPU to Accelerate: it starts the processes, the trainer shards the model (glmkit/train/fsdp.py).
@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("fsdp", "MULTI_GPU")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(os.path.join(KIT_ROOT, "configs", "accelerate", f"{name}.yaml"))
    assert loaded.distributed_type.name == kind


def test_launch_env_rejects_a_bad_config(kit):
    result = subprocess.run([sys.executable, "-m", "glmkit.launch.env", "--config", kit["config"],
                             "--set", "distributed.num_processes=0"], capture_output=True, text=True, cwd=KIT_ROOT)
    assert result.returncode == 2
    assert "distributed.num_processes" in result.stderr and result.stdout == ""


# ---------------------------------------------------------------------------
# Auto-resume: which checkpoint counts
# ---------------------------------------------------------------------------

def test_latest_complete_checkpoint_ignores_temp_and_incomplete(kit):
    out = kit["output_dir"]
    complete = make_checkpoint(out, "checkpoint-10", complete=True)
    make_checkpoint(out, "checkpoint-20", complete=False)       # killed while writing
    make_checkpoint(out, ".tmp-checkpoint-30", complete=True)   # never renamed into place
    cfg = load_config(kit["config"])
    assert launch_values(cfg)["KIT_LATEST_CHECKPOINT"] == complete


def test_no_checkpoint_when_only_partial_folders(kit):
    make_checkpoint(kit["output_dir"], "checkpoint-20", complete=False)
    make_checkpoint(kit["output_dir"], ".tmp-checkpoint-30", complete=True)
    assert launch_values(load_config(kit["config"]))["KIT_LATEST_CHECKPOINT"] == ""


def test_run_status_comes_from_the_last_run_end(kit):
    logs = os.path.join(kit["output_dir"], "logs")
    os.makedirs(logs)
    with open(os.path.join(logs, "events_log.jsonl"), "w", encoding="utf-8") as fh:
        for status in ("preempted", "finished"):
            fh.write(json.dumps({"step": 1, "time": 0, "event": "run_end", "status": status}) + "\n")
    assert launch_values(load_config(kit["config"]))["KIT_RUN_STATUS"] == "finished"


def test_launcher_resumes_from_the_latest_complete_checkpoint(kit):
    make_checkpoint(kit["output_dir"], "checkpoint-10", complete=True)
    make_checkpoint(kit["output_dir"], "checkpoint-20", complete=False)
    result = run_launcher("--config", kit["config"], "--dry-run")
    assert result.returncode == 0, result.stderr
    cmd = command_line(result)
    assert "--resume" in cmd and "--resume_from" not in cmd
    assert f"resuming from {os.path.join(kit['output_dir'], 'checkpoint-10')}" in result.stdout


@pytest.mark.parametrize("args,expected", [
    (["--resume_from", "/some/checkpoint-5"], ["--resume_from", "/some/checkpoint-5"]),
    (["--", "--resume_from", "/given/checkpoint-7"], ["--resume_from", "/given/checkpoint-7"]),
])
def test_resume_options_override_auto_resume(kit, args, expected):
    make_checkpoint(kit["output_dir"], "checkpoint-10", complete=True)
    result = run_launcher("--config", kit["config"], "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    cmd = command_line(result)
    trainer_args = cmd[cmd.index(os.path.join(KIT_ROOT, "train_qlora.py")) + 1:]
    assert [a for a in trainer_args if a.startswith("--resume")] == [a for a in expected if a.startswith("--")]
    if expected:
        assert option(trainer_args, "--resume_from") == expected[1]


def test_fresh_run_without_checkpoints(kit):
    result = run_launcher("--config", kit["config"], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "--resume" not in command_line(result)
    assert "starting a fresh run" in result.stdout


def test_no_resume_without_checkpoints_starts_fresh(kit):
    make_checkpoint(kit["output_dir"], "checkpoint-20", complete=False)  # a killed write is not a run to keep
    result = run_launcher("--config", kit["config"], "--dry-run", "--no-resume")
    assert result.returncode == 0, result.stderr
    assert not [a for a in command_line(result) if a.startswith("--resume")]
    assert "--no-resume: starting fresh" in result.stdout


@pytest.mark.trains
def test_no_resume_on_an_existing_run_is_one_line(kit):
    """Not a dry run: the real script, which used to launch and end in a CalledProcessError traceback."""
    checkpoint = make_checkpoint(kit["output_dir"], "checkpoint-10", complete=True)
    before = sorted(os.listdir(kit["output_dir"]))

    result = run_launcher("--config", kit["config"], "--no-resume")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    err = result.stderr.strip()
    assert "\n" not in err, err
    assert kit["output_dir"] in err and checkpoint in err
    assert "drop --no-resume" in err and "--resume_from" in err and "paths.output_dir" in err
    assert "[launch] command:" not in result.stdout  # refused before anything was launched
    assert sorted(os.listdir(kit["output_dir"])) == before


# ---------------------------------------------------------------------------
# Refusals, with the fix in the message
# ---------------------------------------------------------------------------

def test_missing_model_dir_is_refused_with_download_hint(kit):
    shutil.rmtree(kit["model_dir"])
    result = run_launcher("--config", kit["config"], "--dry-run")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err
    assert kit["model_dir"] in err and "python download_model.py" in err and "--tiny" in err


def test_missing_data_is_refused(kit):
    os.remove(kit["data"])
    result = run_launcher("--config", kit["config"], "--dry-run")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err and kit["data"] in err and "paths.data_path" in err


def test_missing_config_is_refused():
    result = run_launcher("--config", "/no/such/config.yaml", "--dry-run")
    assert result.returncode == 2 and "/no/such/config.yaml" in result.stderr


def test_config_folder_is_refused_in_one_line(kit):
    result = run_launcher("--config", str(kit["root"]), "--dry-run")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err and "is a folder" in err and "not found" not in err


def test_bad_config_is_reported_once(kit):
    result = run_launcher("--config", kit["config"], "--dry-run", "--set", "distributed.num_processes=0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "distributed.num_processes" in result.stderr
    assert "launch_training.sh:" not in result.stderr  # the helper's line says it all


def test_output_dir_that_is_a_file_is_refused(kit):
    with open(kit["output_dir"], "w", encoding="utf-8") as fh:
        fh.write("my notes\n")
    result = run_launcher("--config", kit["config"], "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    err = result.stderr.strip()
    assert "\n" not in err and "paths.output_dir" in err and "is a file" in err
    with open(kit["output_dir"], encoding="utf-8") as fh:
        assert fh.read() == "my notes\n"


def test_events_log_that_is_a_folder_is_one_line(kit):
    os.makedirs(os.path.join(kit["output_dir"], "logs", "events_log.jsonl"))
    result = run_launcher("--config", kit["config"], "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    err = result.stderr.strip()
    assert "\n" not in err and "events_log.jsonl" in err and "paths.output_dir" in err


def test_events_log_with_bytes_that_are_not_utf8_does_not_block_a_launch(kit):
    logs = os.path.join(kit["output_dir"], "logs")
    os.makedirs(logs)
    with open(os.path.join(logs, "events_log.jsonl"), "wb") as fh:
        fh.write(b'\xff\xfe{"event": "run_end"}\n')
    result = run_launcher("--config", kit["config"], "--dry-run")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name,value", [("NUM_MACHINES", "1.5"), ("MACHINE_RANK", "node1"),
                                        ("MAIN_PROCESS_PORT", "29500x")])
def test_environment_numbers_are_checked(kit, name, value):
    result = run_launcher("--config", kit["config"], "--dry-run", env=launcher_env(**{name: value}))
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err and name in err and value in err


def test_run_that_does_not_fit_is_refused_unless_forced(kit):
    tiny_gpu = ["--set", "distributed.gpu_memory_gb=0.001"]
    refused = run_launcher("--config", kit["config"], "--dry-run", *tiny_gpu)
    assert refused.returncode == 3
    assert "memory plan: DOES NOT FIT" in refused.stdout and "--force" in refused.stderr
    forced = run_launcher("--config", kit["config"], "--dry-run", "--force", *tiny_gpu)
    assert forced.returncode == 0, forced.stderr
    cmd = command_line(forced)
    assert "--force" in cmd and "distributed.gpu_memory_gb=0.001" in cmd


# ---------------------------------------------------------------------------
# The accelerate command: processes, CPU path, machines, environment
# ---------------------------------------------------------------------------

@pytest.mark.skipif(not NO_GPU, reason="checks the CPU path")
def test_cpu_path_two_processes_over_gloo(kit):
    result = run_launcher("--config", kit["config"], "--dry-run", "--set", "distributed.num_processes=2",
                          env=launcher_env(HF_HOME="/preset/hf"))
    assert result.returncode == 0, result.stderr
    cmd = command_line(result)
    assert cmd[1:3] == ["-m", "glmkit.launch.accelerate"]
    assert option(cmd, "--num_processes") == "2" and "--multi_gpu" in cmd and "--cpu" not in cmd
    assert "ACCELERATE_USE_CPU=true" in result.stdout
    assert "HF_HOME=/preset/hf" in result.stdout  # the environment wins
    assert f"TMPDIR={os.path.join(kit['scratch'], 'tmp')}" in result.stdout  # defaults go under scratch_dir
    assert option(cmd, "--config") == kit["config"]
    assert cmd[cmd.index("--config") + 2:cmd.index("--config") + 4] == ["--set", "distributed.num_processes=2"]


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU path")
def test_cpu_path_single_process(kit):
    result = run_launcher("--config", kit["config"], "--dry-run")
    cmd = command_line(result)
    assert option(cmd, "--num_processes") == "1" and "--cpu" in cmd and "--multi_gpu" not in cmd


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU path")
def test_cpu_path_runs_fsdp_over_gloo_and_refuses_deepspeed(kit):
    result = run_launcher("--config", kit["config"], "--dry-run", "--set", "distributed.accelerate_config=fsdp",
                          "--set", "distributed.num_processes=2")
    assert result.returncode == 0, result.stderr
    cmd = command_line(result)
    assert option(cmd, "--num_processes") == "2" and "--multi_gpu" in cmd and "strategy fsdp" in result.stdout
    result = run_launcher("--config", kit["config"], "--dry-run", "--set", "distributed.accelerate_config=deepspeed_zero3")
    assert result.returncode == 2
    assert "distributed.accelerate_config: deepspeed_zero3 is no longer offered" in result.stderr
    assert "use fsdp" in result.stderr


def test_multinode_variables_map_onto_accelerate(kit):
    env = launcher_env(NUM_MACHINES="2", MACHINE_RANK="1", MAIN_PROCESS_IP="10.0.0.7", MAIN_PROCESS_PORT="29555")
    result = run_launcher("--config", kit["config"], "--dry-run", "--set", "distributed.num_processes=2", env=env)
    assert result.returncode == 0, result.stderr
    cmd = command_line(result)
    assert option(cmd, "--num_processes") == "4"  # over all machines, as accelerate counts
    assert option(cmd, "--num_machines") == "2" and option(cmd, "--machine_rank") == "1"
    assert option(cmd, "--main_process_ip") == "10.0.0.7" and option(cmd, "--main_process_port") == "29555"


def test_machine_rank_defaults_to_slurm_node_id(kit):
    env = launcher_env(NUM_MACHINES="3", SLURM_NODEID="2", MAIN_PROCESS_IP="node001")
    cmd = command_line(run_launcher("--config", kit["config"], "--dry-run", env=env))
    assert option(cmd, "--machine_rank") == "2" and option(cmd, "--main_process_port") == "29500"


def test_multinode_without_main_ip_is_refused(kit):
    result = run_launcher("--config", kit["config"], "--dry-run", env=launcher_env(NUM_MACHINES="2"))
    assert result.returncode == 2 and "MAIN_PROCESS_IP" in result.stderr


def test_trainer_overrides_reach_the_helper(kit):
    elsewhere = os.path.join(str(kit["root"]), "elsewhere")
    result = run_launcher("--config", kit["config"], "--dry-run", "--", "--set", f"paths.output_dir={elsewhere}",
                          "--some-trainer-flag")
    assert result.returncode == 0, result.stderr
    assert f"output {elsewhere}" in result.stdout
    cmd = command_line(result)
    assert f"paths.output_dir={elsewhere}" in cmd and cmd[-1] == "--some-trainer-flag"


@pytest.mark.trains
def test_unknown_launcher_option_is_refused():
    result = run_launcher("--frobnicate")
    assert result.returncode == 2 and "--frobnicate" in result.stderr


# ---------------------------------------------------------------------------
# shellcheck
# ---------------------------------------------------------------------------

@pytest.mark.trains
@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", [LAUNCHER, SLURM_EXAMPLE])
def test_shellcheck_clean(script):
    result = subprocess.run(["shellcheck", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------
# End to end on CPU: train the tiny model with 2 processes, then resume on its own
# ---------------------------------------------------------------------------

def _trainer_ready() -> bool:
    if not os.path.isfile(os.path.join(KIT_ROOT, "train_qlora.py")):
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("glmkit.demo.tiny", "glmkit.demo.corpus", "glmkit.model.load"))


def _tiny_settings(tmp_path, model_dir, corpus, **extra) -> list[str]:
    settings = []
    for key, value in {"paths.model_dir": model_dir, "paths.data_path": corpus,
                       "paths.output_dir": tmp_path / "out", "paths.best_adapter_dir": tmp_path / "best",
                       "paths.scratch_dir": tmp_path / "scratch", **extra}.items():
        settings += ["--set", f"{key}={value}"]
    return settings


@pytest.mark.trains
@pytest.mark.skipif(not NO_GPU, reason="the CPU path (gloo) is what this test exercises")
@pytest.mark.skipif(not _trainer_ready(), reason="train_qlora.py / glmkit.demo.tiny not written yet")
@pytest.mark.parametrize("processes", [1, 2])
def test_trainer_refusal_comes_back_without_a_launcher_traceback(tmp_path, tiny_model_dir, demo_corpus, processes):
    """accelerate used to wrap the trainer's one-line exit 2 in a CalledProcessError / ChildFailedError traceback."""
    settings = _tiny_settings(tmp_path, tiny_model_dir, demo_corpus, **{"distributed.num_processes": processes})
    tiny = os.path.join(KIT_ROOT, "configs", "tiny.yaml")
    missing = str(tmp_path / "no-such-checkpoint")

    result = run_launcher("--config", tiny, *settings, "--", "--resume_from", missing,
                          env=launcher_env(MAIN_PROCESS_PORT=str(free_port())), timeout=600)

    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "CalledProcessError" not in output and "ChildFailedError" not in output
    errors = {line for line in result.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and missing in errors.pop()  # every rank says the same one line


def _events(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "logs", "events_log.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.trains
@pytest.mark.skipif(not NO_GPU, reason="the CPU path (gloo) is what this test exercises")
@pytest.mark.skipif(not _trainer_ready(), reason="train_qlora.py / glmkit.demo.tiny not written yet")
def test_two_process_cpu_run_resumes_by_itself(tmp_path, tiny_model_dir, demo_corpus):
    out = str(tmp_path / "out")
    settings = []
    for key, value in {"paths.model_dir": tiny_model_dir, "paths.data_path": demo_corpus,
                       "paths.output_dir": out, "paths.best_adapter_dir": tmp_path / "best",
                       "paths.scratch_dir": tmp_path / "scratch", "distributed.num_processes": 2,
                       "logging.eval_interval": 2, "checkpoint.interval": 2}.items():
        settings += ["--set", f"{key}={value}"]
    tiny = os.path.join(KIT_ROOT, "configs", "tiny.yaml")
    env = launcher_env(MAIN_PROCESS_PORT=str(free_port()))

    first = run_launcher("--config", tiny, *settings, "--set", "training.max_steps=2", env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "starting a fresh run" in first.stdout
    starts = [e for e in _events(out) if e["event"] == "run_start"]
    assert starts[-1]["world_size"] == 2  # one gloo group, not two lone processes

    second = run_launcher("--config", tiny, *settings, "--set", "training.max_steps=4", env=env, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout and "--resume" in command_line(second)
    events = _events(out)
    resumes = [e for e in events if e["event"] == "resume"]
    assert resumes and resumes[-1]["from_step"] == 2
    ends = [e for e in events if e["event"] == "run_end"]
    assert ends[-1]["status"] == "finished" and ends[-1]["step"] == 4

    third = run_launcher("--config", tiny, *settings, "--set", "training.max_steps=4", env=env, timeout=900)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "already finished" in third.stdout + third.stderr
    assert len([e for e in _events(out) if e["event"] == "run_start"]) == len(
        [e for e in events if e["event"] == "run_start"])
