"""Shared fixtures: the tiny GLM-4.5-Air checkpoint and the demo corpus, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")


# Both are built in a fresh process, as `download_model.py --tiny` and `python -m glmkit.demo_data` do:
# the tokenizer and the corpus come from pydoc renderings, which pytest's own imports would change.

def write_tiny_model_in_fresh_process(path: str, env: dict | None = None) -> None:
    code = f"from glmkit.tiny import write_tiny_checkpoint; write_tiny_checkpoint({path!r}, seed=0)"
    result = run_cli(["-c", code], env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def write_demo_corpus_in_fresh_process(path: str, max_docs: int, env: dict | None = None) -> None:
    code = f"from glmkit.demo_data import write_demo_corpus; write_demo_corpus({path!r}, max_docs={max_docs})"
    result = run_cli(["-c", code], env=env)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-model"))
    write_tiny_model_in_fresh_process(path)
    return path


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "demo.jsonl")
    write_demo_corpus_in_fresh_process(path, max_docs=400)
    return path


def write_tiny_config(folder, model_dir: str, data_path: str, overrides: dict | None = None,
                      name: str = "config.yaml") -> str:
    """configs/tiny.yaml with paths inside `folder` and {"section.key": value} overrides; return its path."""
    with open(TINY_CONFIG, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    data["paths"].update(model_dir=model_dir, data_path=data_path, output_dir=str(folder / "run"),
                         best_adapter_dir=str(folder / "best"), scratch_dir=str(folder / "scratch"))
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        data[section][key] = value
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, demo_corpus):
    """Write a tiny config into tmp_path with overrides {"section.key": value}; return its path."""

    def make(overrides: dict | None = None, name: str = "config.yaml") -> str:
        return write_tiny_config(tmp_path, tiny_model_dir, demo_corpus, overrides, name)

    return make


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a kit command as a user would, from the repo root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
