"""The config's keys as data: their dotted names, which ones a checkpoint depends on, a config flattened for
comparison and for the trackers."""

from __future__ import annotations

import dataclasses
import typing

from glmkit.config.schema import NOT_SECTIONS, Config


def flatten(config_dict: dict, world_size: int) -> dict:
    """A config dict as flat "section.key" values plus world_size: what checkpoints compare and trackers log."""
    flat = {f"{section}.{key}": value for section, values in config_dict.items() if isinstance(values, dict)
            for key, value in values.items()}
    flat["world_size"] = world_size
    return flat


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name not in NOT_SECTIONS]


def config_fields():
    """(dotted key, dataclasses.Field) for every key, in file order."""
    hints = typing.get_type_hints(Config)
    return [(f"{name}.{f.name}", f) for name in section_names() for f in dataclasses.fields(hints[name])]


def critical_keys() -> list[str]:
    """Keys a checkpoint depends on: a resume refuses to continue if one changed."""
    return [key for key, f in config_fields() if f.metadata.get("critical")]


def keys_checked_otherwise() -> list[str]:
    """Keys a resume compares by another rule than equality (paths.data_path: the data fingerprint)."""
    return [key for key, f in config_fields() if f.metadata.get("on_resume")]
