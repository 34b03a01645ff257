"""Loading a config: YAML file -> mapping -> `--set` overrides -> moved keys -> dataclasses -> absolute paths ->
validation, with every problem collected into one ConfigError.

Relative paths resolve against the folder of the config file, so the trainer, the launcher, auto-resume and the
dashboard always agree on where things live. Keys that moved to another section are still read for a release,
with a one-line notice (`Config.notices`, printed by glmkit/config/cli.py), and a problem with such a key is
reported under the name the file used.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import stat
import typing
from typing import Optional

import yaml

from glmkit.config.keys import section_names
from glmkit.config.parse import apply_override, build_section
from glmkit.config.schema import Config, ConfigError, PathsSection
from glmkit.config.strategy import ACCELERATE_CONFIGS, REMOVED_STRATEGIES
from glmkit.config.validate import validate
from glmkit.config.yaml_file import YamlFileError, load_yaml_file

# Keys that moved, old dotted name -> new one (2026-12: checkpoint settings left `logging`). Read until the
# next release, with a notice; the file keeps working unchanged.
MOVED_KEYS = {"logging.checkpoint_interval": "checkpoint.interval", "logging.keep_top_k": "checkpoint.keep_top_k"}


def load_config(path: str | os.PathLike, overrides: typing.Iterable[str] = ()) -> Config:
    """Load, override, resolve and validate; raise ConfigError listing every problem."""
    path = os.path.abspath(os.fspath(path))
    problem = _unreadable(path)
    if problem:
        raise ConfigError([f"config: {path} {problem}; pass --config PATH to a YAML file such as training_config.yaml"])
    try:
        data = load_yaml_file(path)
    except OSError as exc:
        raise ConfigError([f"config: {path} cannot be read ({exc.strerror or exc}); fix its permissions or pass "
                           f"--config another file"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"]) from None
    except YamlFileError as exc:
        raise ConfigError([f"config: {path}: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"config: {path} is not valid YAML{where}; fix the syntax there"]) from None
    if data is None:
        raise ConfigError([f"config: {path} is empty; start from a copy of training_config.yaml"])
    if not isinstance(data, dict):
        raise ConfigError([f"config: {path} must be a mapping of sections (model:, paths:, training:, ...)"])
    problems: list[str] = []
    for override in overrides:
        apply_override(data, override, problems)
    return config_from_dict(data, base_dir=os.path.dirname(path), source_path=path, problems=problems)


def move_renamed_keys(data: dict, problems: list[str]) -> dict[str, str]:
    """Move keys that changed section to their new place in the raw mapping; {new dotted key: old one} moved.

    Also used on the resolved configs that older checkpoints carry, so a resume compares like with like."""
    moved = {}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = data.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        if data.get(new_section) is None:
            data[new_section] = {}
        target = data[new_section]
        if not isinstance(target, dict):
            continue  # build_section reports the section's shape
        value = section.pop(old_key)
        if new_key in target:
            problems.append(f"{old}: set twice, here and as {new}; keep only {new}")
            continue
        target[new_key] = value
        moved[new] = old
    return moved


def moved_keys_notice(moved: dict[str, str], source: Optional[str]) -> Optional[str]:
    """One line naming every old key a file still uses and its new name (None: it uses none)."""
    if not moved:
        return None
    pairs = ", ".join(f"{old} -> {new}" for new, old in moved.items())
    where = f" in {source}" if source else ""
    return (f"notice: renamed config keys{where}: {pairs}; the old names are still read for this release, "
            f"rename them to keep the file working")


def _unreadable(path: str) -> Optional[str]:
    """Why the config file at `path` can't be opened, in a few words (None: it is a regular file)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (a link that leads back to itself)"
        if exc.errno == errno.ENOENT:
            return "does not exist" if not os.path.islink(path) else "is a symlink to nothing"
        return f"cannot be read ({exc.strerror})"
    return "is a directory, not a file" if stat.S_ISDIR(info.st_mode) else None if stat.S_ISREG(info.st_mode) \
        else "is not a regular file"


def config_from_dict(data: dict, base_dir: str, source_path: Optional[str] = None,
                     problems: Optional[list[str]] = None) -> Config:
    problems = [] if problems is None else problems
    moved = move_renamed_keys(data, problems)
    hints = typing.get_type_hints(Config)
    sections = {}
    names = section_names()
    for name, raw in data.items():
        if name not in names:
            guess = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean {guess[0]}?" if guess else f"; sections are {', '.join(names)}"
            problems.append(f"{name}: unknown section{hint}")
            continue
        sections[name] = build_section(hints[name], raw, name, problems)
    notice = moved_keys_notice(moved, source_path)
    cfg = Config(**sections, source_path=source_path, notices=[notice] if notice else [])
    _resolve_paths(cfg, base_dir)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError([_as_written(problem, moved) for problem in problems])
    return cfg


def _as_written(problem: str, moved: dict[str, str]) -> str:
    """A problem with a moved key, named as the file names it (the user fixes the line they wrote)."""
    for new, old in moved.items():
        if problem.startswith(f"{new}:"):
            return old + problem[len(new):]
    return problem


def _resolve_paths(cfg: Config, base_dir: str) -> None:
    for f in dataclasses.fields(PathsSection):
        value = getattr(cfg.paths, f.name)
        if isinstance(value, str):
            setattr(cfg.paths, f.name, os.path.normpath(os.path.join(base_dir, os.path.expanduser(value))))
    if isinstance(cfg.paths.data_path, list):  # glob characters pass through unchanged
        for source in cfg.paths.data_path:
            source.path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(source.path)))
    for entry in cfg.eval.sets:
        entry.path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(entry.path)))
    acc = cfg.distributed.accelerate_config
    if acc and acc not in ACCELERATE_CONFIGS and acc not in REMOVED_STRATEGIES:
        cfg.distributed.accelerate_config = os.path.normpath(os.path.join(base_dir, os.path.expanduser(acc)))
