"""The YAML contract: every shipped file validates; every problem in a bad one is reported at once."""

import os

import pytest
import yaml

from conftest import ROOT, run_cli
from glmkit.config import ConfigError, load_config

SHIPPED = ["training_config.yaml", "configs/tiny.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    cfg = load_config(os.path.join(ROOT, name))
    assert os.path.isabs(cfg.paths.output_dir)
    assert cfg.logs_dir == os.path.join(cfg.paths.output_dir, "logs")


def test_real_recipe_is_the_documented_one():
    cfg = load_config(os.path.join(ROOT, "training_config.yaml"))
    assert cfg.model.name_or_path == "zai-org/GLM-4.5-Air"
    assert (cfg.quantization.quant_type, cfg.quantization.double_quant, cfg.quantization.quantize_experts) == ("nf4", True, True)
    assert cfg.lora.r == 16 and cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.training.max_seq_length == 4096


def test_every_shipped_key_has_a_comment():
    """Each key of the real recipe carries a comment saying what it trades off (bar the Adam constants)."""
    with open(os.path.join(ROOT, "training_config.yaml"), encoding="utf-8") as fh:
        lines = [l for l in fh if l.startswith("  ") and ":" in l]
    uncommented = [l.split(":")[0].strip() for l in lines if "#" not in l]
    assert set(uncommented) <= {"adam_beta1", "adam_epsilon"}, uncommented


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


def test_invalid_yaml_is_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("training:\n  epochs: [1\n")
    result = run_cli(["train_qlora.py", "--config", str(tmp_path / "broken.yaml")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not valid YAML at line" in result.stderr


def config_keys() -> list[tuple[str, str]]:
    import dataclasses

    from glmkit.config import Config

    return [(section.name, key.name) for section in dataclasses.fields(Config) if section.name != "source_path"
            for key in dataclasses.fields(section.default_factory())]


def test_readme_documents_every_config_key():
    rows = [line for line in open(os.path.join(ROOT, "README.md"), encoding="utf-8") if line.startswith("| `")]
    missing = [f"{s}.{k}" for s, k in config_keys()
               if not any(f"`{s}.{k}`" in row or (f"`{s}." in row and f"`{k}`" in row) for row in rows)]
    assert missing == []


@pytest.mark.parametrize("yaml_file", ["training_config.yaml", "configs/tiny.yaml"])
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
        if "#" not in line and yaml_file == "training_config.yaml":
            bare.append(f"{section}.{key}")
    assert set(config_keys()) - seen == set() and bare == []
