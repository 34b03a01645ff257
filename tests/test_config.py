"""The YAML contract: every shipped file validates; every problem in a bad one is reported at once."""

import os
import subprocess
import time

import pytest
import yaml
from conftest import ROOT, run_cli

from glmkit.config.docs_table import config_table
from glmkit.config.keys import config_fields, critical_keys, keys_checked_otherwise
from glmkit.config.load import load_config
from glmkit.config.schema import ConfigError

SHIPPED = ["training_config.yaml", "configs/tiny.yaml", "configs/glm45-air-128k.yaml", "configs/cpt_chat_replay.yaml",
           "configs/sft_after_cpt.yaml", "configs/glm47_flash.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    cfg = load_config(os.path.join(ROOT, name))
    assert os.path.isabs(cfg.paths.output_dir)
    assert cfg.logs_dir == os.path.join(cfg.paths.output_dir, "logs")


def test_real_recipe_is_the_documented_one():
    cfg = load_config(os.path.join(ROOT, "training_config.yaml"))
    assert cfg.model.name_or_path == "zai-org/GLM-4.5-Air"
    assert (cfg.quantization.quant_type, cfg.quantization.double_quant, cfg.quantization.quantize_experts) == ("nf4", True, True)
    # `attention`: on GLM-4.5-Air's architecture q_proj, k_proj, v_proj, o_proj, as the recipe always had
    assert cfg.lora.r == 16 and cfg.lora.target_modules == ["attention"]
    from glmkit.model.lora import peft_module_names
    from glmkit.plan.weights import GLM45_AIR_NAME, build_meta_model, builtin_config

    air = build_meta_model(builtin_config(GLM45_AIR_NAME), "bfloat16")
    assert peft_module_names(air, cfg.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.training.max_seq_length == 4096


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"paths": {"output_dir": "out", "model_dir": "../m"}}))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.paths.output_dir == str(tmp_path / "out")
    assert cfg.paths.model_dir == str(tmp_path.parent / "m")


def test_all_problems_reported_together(tmp_path):
    bad = {
        "training": {"learning_rate": 1e-4, "val_fraction": 1.5, "epochs": "two"},
        "optimization": {"learning_rate": 0, "lr_scheduler": "step"},
        "lora": {"r": 0},
        "logging": {"eval_interval": 0},
        "loggin": {},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "bad.yaml")
    problems = info.value.problems
    joined = "\n".join(problems)
    assert "training.learning_rate: unknown key; did you mean optimization" not in joined  # suggestion is per section
    assert any(p.startswith("training.learning_rate: unknown key") for p in problems)
    assert any(p.startswith("training.val_fraction: must be in [0, 1)") for p in problems)
    assert any(p.startswith("training.epochs: expected an integer") for p in problems)
    assert any(p.startswith("optimization.learning_rate: must be > 0") for p in problems)
    assert any(p.startswith("optimization.lr_scheduler: 'step' is not allowed") for p in problems)
    assert any(p.startswith("lora.r: must be >= 1") for p in problems)
    assert any(p.startswith("logging.eval_interval: must be >= 1") for p in problems)
    assert any(p.startswith("loggin: unknown section; did you mean logging?") for p in problems)


def test_did_you_mean_for_a_typo(tmp_path):
    (tmp_path / "c.yaml").write_text("optimization:\n  learning_rat: 0.001\n")
    with pytest.raises(ConfigError, match=r"optimization.learning_rat: unknown key; did you mean optimization.learning_rate\?"):
        load_config(tmp_path / "c.yaml")


def test_contradiction_between_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("quantization:\n  load_in_4bit: false\n  quantize_experts: true\n"
                                     "logging:\n  eval_interval: 30\n  checkpoint_interval: 45\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    keys = [p.split(":")[0] for p in info.value.problems]
    assert keys == ["quantization.quantize_experts", "logging.checkpoint_interval"]


def test_overrides_are_validated_like_the_file():
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["training.max_steps=7", "lora.target_modules=[q_proj]"])
    assert cfg.training.max_steps == 7 and cfg.lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match=r"lora.r: expected an integer, got 'big'"):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["lora.r=big"])
    with pytest.raises(ConfigError, match=r"--set nonsense: expected dotted.key=value"):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["nonsense"])


def test_cli_prints_one_line_per_problem_and_exits_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("optimization:\n  learning_rate: -1\nlora:\n  r: 0\n")
    for script in ("train_qlora.py", "download_model.py"):
        result = run_cli([script, "--config", str(tmp_path / "bad.yaml"), "--verify-only" if script == "download_model.py" else "--plan"])
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines == ["config error: optimization.learning_rate: must be > 0, got -1.0",
                         "config error: lora.r: must be >= 1, got 0"]


@pytest.mark.trains
def test_invalid_yaml_is_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("training:\n  epochs: [1\n")
    result = run_cli(["train_qlora.py", "--config", str(tmp_path / "broken.yaml")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not valid YAML at line" in result.stderr


def config_keys() -> list[tuple[str, str]]:
    return [tuple(key.split(".")) for key, _ in config_fields()]


def test_readme_config_table_is_generated_from_the_fields():
    """Help, default, bounds and the resume rule are written once, beside each field; the docs' table shows them."""
    readme = open(os.path.join(ROOT, "docs", "CONFIGURATION.md"), encoding="utf-8").read()
    start = readme.index("<!-- config-table")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- /config-table -->")]
    assert block == config_table(), "run: python -m glmkit.config.docs_table --update"
    assert all(f.metadata.get("help") for _, f in config_fields())


def test_resume_critical_keys_come_from_the_field_declarations():
    keys = critical_keys()
    assert {"lora.r", "training.seed", "optimization.grad_accum_steps"} <= set(keys)
    # The data is compared by its fingerprint (files, sizes, mtimes, validation content), not by the path's spelling.
    assert "paths.data_path" not in keys and "paths.data_path" in keys_checked_otherwise()
    # What a resume may change must be able to take effect (see glmkit/train/optim.py): never critical.
    assert not {"optimization.learning_rate", "optimization.weight_decay", "training.max_steps"} & set(keys)


# Recipes for the tiny CPU model: every key, commented where it differs from training_config.yaml's reason.
TINY_RECIPES = {"configs/tiny.yaml", "configs/cpt_chat_replay.yaml", "configs/sft_after_cpt.yaml"}


@pytest.mark.parametrize("yaml_file", SHIPPED)
def test_every_yaml_key_is_present_and_commented(yaml_file):
    """The one YAML a user edits says, beside each key, what it trades off."""
    lines = open(os.path.join(ROOT, yaml_file), encoding="utf-8").read().splitlines()
    section, seen, bare = None, set(), []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.split(":")[0]
            continue
        key = line.split(":")[0].strip()
        seen.add((section, key))
        if "#" not in line and yaml_file not in TINY_RECIPES:
            bare.append(f"{section}.{key}")
    assert set(config_keys()) - seen == set() and bare == []


@pytest.mark.parametrize("text, expected", [("5e-5", 5e-5), ("1E-4", 1e-4), ("2e-3", 2e-3), ("3.0e-4", 3e-4)])
def test_exponent_floats_without_a_dot_are_numbers(tmp_path, text, expected):
    """PyYAML reads `5e-5` as a string; float keys take it, in the file and in --set."""
    (tmp_path / "c.yaml").write_text(f"optimization:\n  learning_rate: {text}\n  adam_epsilon: {text}\n")
    cfg = load_config(tmp_path / "c.yaml", [f"optimization.weight_decay={text}"])
    assert (cfg.optimization.learning_rate, cfg.optimization.adam_epsilon, cfg.optimization.weight_decay) == (expected,) * 3


def test_the_header_example_of_the_real_recipe_works():
    header = open(os.path.join(ROOT, "training_config.yaml"), encoding="utf-8").read().split("\n\n")[0]
    override = header.split("--set ")[1].split()[0]
    cfg = load_config(os.path.join(ROOT, "training_config.yaml"), [override])
    assert cfg.optimization.learning_rate == 5e-5


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "'inf'", "'nan'"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    (tmp_path / "c.yaml").write_text(f"optimization:\n  learning_rate: {value}\n")
    with pytest.raises(ConfigError, match=r"^optimization.learning_rate: expected a (finite )?number"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.trains
@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes("training:\n  text_field: caf\xe9\n".encode("latin-1")), "is not UTF-8 text"),
    (lambda p: p.mkdir(), "is a directory, not a file"),
    (lambda p: p.write_text(""), "is empty; start from a copy of training_config.yaml"),
    (lambda p: p.write_text("# only comments\n"), "is empty"),
])
def test_unreadable_config_files_are_one_line(tmp_path, make, message):
    path = tmp_path / "c.yaml"
    make(path)
    result = run_cli(["train_qlora.py", "--config", str(path)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


@pytest.mark.parametrize("best, key", [
    ("{out}", "paths.output_dir"),              # the run folder itself
    ("{root}", "paths.output_dir"),             # the parent of everything
    ("{out}/logs", "paths.output_dir"),         # inside the run folder: its logs
    ("{model}", "paths.model_dir"),             # the downloaded weights
    ("{model}/..", "paths.model_dir"),
    ("{scratch}/best", "paths.scratch_dir"),
    ("{data}", "paths.data_path"),
])
def test_best_adapter_dir_overlapping_another_path_is_refused(tmp_path, best, key):
    root = tmp_path / "root"
    paths = {"out": root / "run", "model": root / "models" / "m", "scratch": root / "scratch",
             "data": root / "data" / "train.jsonl", "root": root}
    target = best.format(**paths)
    data = {"paths": {"output_dir": str(paths["out"]), "model_dir": str(paths["model"]),
                      "scratch_dir": str(paths["scratch"]), "data_path": str(paths["data"]),
                      "best_adapter_dir": target}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert any(p.startswith("paths.best_adapter_dir:") and key in p for p in info.value.problems), info.value.problems


@pytest.mark.trains
def test_flash_attention_2_needs_flash_attn_else_one_line_pointing_at_varlen(tmp_path):
    from glmkit.config.validate import flash_attn_importable

    if flash_attn_importable():
        pytest.skip("flash-attn imports here: flash_attention_2 is allowed")
    (tmp_path / "fa2.yaml").write_text("model:\n  attn_implementation: flash_attention_2\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "fa2.yaml")
    assert info.value.problems == ["model.attn_implementation: flash_attention_2 needs the flash-attn package, which "
                                   "does not import here; use varlen (torch's own flash-attention varlen kernel, "
                                   "nothing to install)"]
    result = run_cli(["train_qlora.py", "--config", str(tmp_path / "fa2.yaml")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"config error: {info.value.problems[0]}"]
    assert load_config(tmp_path / "fa2.yaml", ["model.attn_implementation=varlen"]).model.attn_implementation == "varlen"


# ---------------------------------------------------------------------------
# Hostile files: duplicate keys, alias bombs, huge files, long values (issue 25)
# ---------------------------------------------------------------------------

def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(tmp_path):
    """A second `training:` section used to reset the first one's keys to their defaults (seed 1234 -> 42)."""
    (tmp_path / "c.yaml").write_text("training:\n  seed: 1234\n  max_seq_length: 256\noptimization:\n"
                                     "  learning_rate: 2.0e-4\ntraining:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert info.value.problems == [
        f"config: {tmp_path / 'c.yaml'}: key 'training' appears twice, at lines 1 and 6 (the second would "
        f"silently replace the first); keep one and merge their settings"]
    (tmp_path / "c.yaml").write_text("training:\n  seed: 1234\n  epochs: 1\n  seed: 7\n")
    with pytest.raises(ConfigError, match=r"key 'training.seed' appears twice, at lines 2 and 4"):
        load_config(tmp_path / "c.yaml")
    # A merge key overrides on purpose: `<<: *base` followed by the key is not a duplicate.
    (tmp_path / "c.yaml").write_text("training: &t\n  seed: 3\noptimization:\n  <<: {learning_rate: 1.0e-3}\n"
                                     "  learning_rate: 2.0e-4\n")
    assert load_config(tmp_path / "c.yaml").optimization.learning_rate == 2e-4


def billion_laughs(levels: int = 9) -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        previous, name = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join(lines) + f"\ntraining:\n  epochs: *{chr(ord('a') + levels - 1)}\n"


def test_alias_bomb_and_huge_file_fail_fast_in_one_line(tmp_path):
    (tmp_path / "bomb.yaml").write_text(billion_laughs())
    (tmp_path / "self.yaml").write_text("training: &t\n  epochs: [*t]\n")
    (tmp_path / "huge.yaml").write_text("training:\n  epochs: 1\n" + "# padding\n" * 120_000)  # 1.2 MB of comments
    for name, words in (("bomb", "its anchors and aliases expand to more than 100,000 values (near line 6)"),
                        ("self", "an alias refers to the value that contains it (near line 1)"),
                        ("huge", "the file is larger than 1 MiB")):
        started = time.perf_counter()
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / f"{name}.yaml")
        assert time.perf_counter() - started < 1.0
        assert len(info.value.problems) == 1 and words in info.value.problems[0], info.value.problems
    # A few shared anchors stay fine: a real config may reuse a value.
    (tmp_path / "ok.yaml").write_text("lora:\n  target_modules: &m [q_proj, v_proj]\nmemory: {}\n")
    assert load_config(tmp_path / "ok.yaml").lora.target_modules == ["q_proj", "v_proj"]


def test_quoted_values_are_truncated_in_messages(tmp_path):
    """A small bomb under the expansion limit, or a long string, is quoted in a few dozen characters."""
    (tmp_path / "c.yaml").write_text(billion_laughs(levels=4) + f"lora:\n  r: '{'x' * 5000}'\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert time.perf_counter() - started < 1.0
    epochs, rank = [p for p in info.value.problems if p.startswith(("training.epochs", "lora.r"))]
    assert epochs.startswith("training.epochs: expected an integer, got [[[[") and len(epochs) < 140
    assert rank.startswith("lora.r: expected an integer, got 'xxx") and "..." in rank and len(rank) < 140


def test_config_file_symlink_loop_is_one_line(tmp_path):
    os.symlink(tmp_path / "b.yaml", tmp_path / "a.yaml")
    os.symlink(tmp_path / "a.yaml", tmp_path / "b.yaml")
    result = run_cli(["train_qlora.py", "--config", str(tmp_path / "a.yaml"), "--plan"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"config error: config: {tmp_path / 'a.yaml'} is a symlink loop (a link that "
                                     f"leads back to itself); pass --config PATH to a YAML file such as "
                                     f"training_config.yaml")


@pytest.mark.parametrize("output_dir, message", [
    ("{model}", "paths.output_dir: {model} is paths.model_dir ({model}); checkpoints and logs would mix"),
    ("{model}/run", "paths.output_dir: {model}/run lies inside paths.model_dir ({model}); checkpoints and logs"),
    ("/", "paths.output_dir: is the filesystem root /; the kit writes (and replaces) files there"),
])
def test_output_dir_inside_the_model_or_at_a_root_is_refused(tmp_path, output_dir, message):
    model = str(tmp_path / "models" / "m")
    paths = {"model_dir": model, "output_dir": output_dir.format(model=model),
             "best_adapter_dir": str(tmp_path / "best"), "scratch_dir": str(tmp_path / "scratch")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"paths": paths}))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert info.value.problems[0].startswith(message.format(model=model)), info.value.problems


def test_source_weight_has_an_upper_bound(tmp_path):
    """A weight of 1e6 used to lay out a million copies of the corpus: 9.7 GB, then a MemoryError."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"paths": {"data_path": [{"path": "a.jsonl", "weight": 1e6}]}}))
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert time.perf_counter() - started < 1.0
    assert info.value.problems == [f"paths.data_path[0].weight: must be <= 1000 (passes over {tmp_path / 'a.jsonl'} "
                                   f"per epoch), got 1e+06; lower it, or the weights of the other sources instead"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only folder: a read-only tmpfs when running as root (as CI does), else a folder without
    write permission; skipped, saying so, where neither can be made."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.trains
def test_unwritable_folders_are_one_line_each_before_anything_starts(tmp_path, read_only_folder):
    """An unwritable output/log folder used to be a PermissionError (or EROFS) traceback."""
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    paths = {"model_dir": str(model), "output_dir": str(read_only_folder / "run"),
             "best_adapter_dir": str(tmp_path / "a-file" / "best"), "scratch_dir": str(tmp_path / "loop-a" / "s")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"paths": paths}))
    result = run_cli(["train_qlora.py", "--config", str(tmp_path / "c.yaml")])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    why = "is on a read-only filesystem" if os.geteuid() == 0 else "is not writable by this user"
    assert result.stderr.strip().splitlines() == [
        f"error: paths.output_dir: cannot write in {read_only_folder / 'run'}: {read_only_folder} {why}; fix the "
        f"permissions or set paths.output_dir to a folder you can write",
        f"error: paths.best_adapter_dir: cannot write in {tmp_path / 'a-file' / 'best'}: {tmp_path / 'a-file'} is "
        f"a file, not a folder; fix the permissions or set paths.best_adapter_dir to a folder you can write",
        f"error: paths.scratch_dir: cannot write in {tmp_path / 'loop-a' / 's'}: {tmp_path / 'loop-a' / 's'} is a "
        f"symlink loop (a link that leads back to itself); fix the permissions or set paths.scratch_dir to a folder "
        f"you can write"]
    assert os.listdir(read_only_folder) == [] and not os.path.exists(tmp_path / "run")


def test_a_run_folder_whose_logs_folder_is_unwritable_is_refused(tmp_path):
    from glmkit.config.folders import unwritable_problems

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "logs").write_text("a file where the logs folder belongs")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"paths": {"output_dir": "run"}}))
    cfg = load_config(tmp_path / "c.yaml")
    assert unwritable_problems(cfg, ("output_dir",)) == [
        f"paths.output_dir: cannot write in {tmp_path / 'run' / 'logs'}: {tmp_path / 'run' / 'logs'} is a file, not a "
        f"folder; fix the permissions or set paths.output_dir to a folder you can write"]
    (tmp_path / "run" / "logs").unlink()
    assert unwritable_problems(cfg, ("output_dir", "scratch_dir", "best_adapter_dir")) == []


def test_deepspeed_zero3_is_refused_pointing_at_fsdp(tmp_path):
    (tmp_path / "ds.yaml").write_text("distributed:\n  accelerate_config: deepspeed_zero3\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "ds.yaml")
    assert info.value.problems == ["distributed.accelerate_config: deepspeed_zero3 is no longer offered (ZeRO-3 could "
                                   "not partition the kit's 4-bit experts, and it was never tested); use fsdp, which "
                                   "shards every 4-bit layer"]
    for kind in ("DEEPSPEED", "FSDP"):  # Accelerate's own plugins: the kit shards the 4-bit model itself
        (tmp_path / "acc.yaml").write_text(f"distributed_type: {kind}\nnum_processes: 2\n")
        (tmp_path / "own.yaml").write_text("distributed:\n  accelerate_config: acc.yaml\n")
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "own.yaml")
        assert len(info.value.problems) == 1 and f"asks Accelerate for {kind}" in info.value.problems[0]
        assert "set distributed.accelerate_config: fsdp" in info.value.problems[0]


def test_checkpoint_keys_under_logging_still_load_with_one_notice(tmp_path):
    """A config written before `checkpoint:` existed keeps working for a release: the values land in the new
    section, the CLI says once which keys to rename, and a key set under both names is refused."""
    text = open(os.path.join(ROOT, "configs", "tiny.yaml"), encoding="utf-8").read()
    old = text.replace("checkpoint:\n  interval: 20\n  keep_top_k: 2\n", "")
    old = old.replace("logging:\n", "logging:\n  checkpoint_interval: 30\n  keep_top_k: 4\n", 1)
    path = tmp_path / "old.yaml"
    path.write_text(old)
    cfg = load_config(path)
    assert (cfg.checkpoint.interval, cfg.checkpoint.keep_top_k) == (30, 4)
    assert cfg.notices == [f"notice: renamed config keys in {path}: logging.checkpoint_interval -> "
                           f"checkpoint.interval, logging.keep_top_k -> checkpoint.keep_top_k; the old names are still "
                           f"read for this release, rename them to keep the file working"]
    assert load_config(os.path.join(ROOT, "configs", "tiny.yaml")).notices == []
    result = run_cli(["train_qlora.py", "--config", str(path), "--plan"])
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("notice: renamed config keys") == 1
    with pytest.raises(ConfigError, match=r"^logging.keep_top_k: set twice, here and as checkpoint.keep_top_k; "
                                          r"keep only checkpoint.keep_top_k$"):
        load_config(path, ["checkpoint.keep_top_k=5"])
