"""Typed parsing of plain YAML data into documented dataclasses, collecting every problem.

Generic over dataclasses: `glmkit.config.schema` declares the sections and their fields, this module
turns `{"key": value}` mappings into them. A field's metadata carries its documentation and
numeric bounds (see `setting`), so the bounds are checked here from one declaration, and the
docs table (docs/CONFIGURATION.md) and the resume rules are derived from the same place.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Literal

import yaml

from glmkit.config.yaml_file import shown

_MISSING = dataclasses.MISSING


def setting(default=_MISSING, help: str = "", *, factory=None, critical: bool = False,
            ge=None, gt=None, le=None, lt=None, parse=None, on_resume: str | None = None):
    """A config field: its default, what it does and trades off, bounds, and whether it pins a checkpoint.

    `critical` marks keys a checkpoint depends on: changing one makes a run unresumable; `on_resume`
    names another rule a resume applies instead of equality. `parse(value, key, problems)` replaces
    the type-driven coercion for a field whose YAML shape the type alone does not describe.
    """
    metadata = {"help": help, "critical": critical}
    if parse is not None:
        metadata["parse"] = parse
    if on_resume is not None:
        metadata["on_resume"] = on_resume
    metadata.update({k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None})
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not _MISSING else f.default


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _as_float(value):
    """A finite float, or None. Accepts `5e-5` and `1E-4`, which PyYAML reads as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def coerce(value, tp, key: str, problems: list[str]):
    """Return `value` as type `tp`, or append a problem and return None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return coerce(value, inner, key, problems)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            problems.append(f"{key}: {shown(value)} is not allowed; use one of {type_name(tp)}")
            return None
        return value
    if origin is list:
        if isinstance(value, str):  # a single name is a list of one
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{key}: expected {type_name(tp)}, got {shown(value)}")
            return None
        return list(value)
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        number = _as_float(value)
        if number is None:
            finite = isinstance(value, float) and not math.isfinite(value)
            problems.append(f"{key}: expected a finite number, got {shown(value)}" if finite
                            else f"{key}: expected {type_name(tp)}, got {shown(value)}")
            return None
        return number
    elif tp is str:
        ok = isinstance(value, str) and value != ""
    if not ok:
        problems.append(f"{key}: expected {type_name(tp)}, got {shown(value)}")
        return None
    return value


def _bound_text(meta: dict) -> str | None:
    lower = ("ge", meta["ge"]) if "ge" in meta else ("gt", meta["gt"]) if "gt" in meta else None
    upper = ("le", meta["le"]) if "le" in meta else ("lt", meta["lt"]) if "lt" in meta else None
    if lower and upper:
        return f"in {'[' if lower[0] == 'ge' else '('}{lower[1]}, {upper[1]}{']' if upper[0] == 'le' else ')'}"
    if lower:
        return f"{'>=' if lower[0] == 'ge' else '>'} {lower[1]}"
    if upper:
        return f"{'<=' if upper[0] == 'le' else '<'} {upper[1]}"
    return None


def bounds_text(f: dataclasses.Field) -> str | None:
    """'>= 1', 'in [0, 1)', ... as declared in the field's metadata (None: no numeric bounds)."""
    return _bound_text(f.metadata)


def _within(value, meta: dict) -> bool:
    return (("ge" not in meta or value >= meta["ge"]) and ("gt" not in meta or value > meta["gt"])
            and ("le" not in meta or value <= meta["le"]) and ("lt" not in meta or value < meta["lt"]))


def bound_problems(section, prefix: str) -> list[str]:
    """'key: must be >= 1, got 0' for each field of `section` outside its declared bounds."""
    problems = []
    for f in dataclasses.fields(section):
        text = _bound_text(f.metadata)
        value = getattr(section, f.name)
        if text is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not _within(value, f.metadata):
            nullable = type(None) in typing.get_args(typing.get_type_hints(type(section))[f.name])
            problems.append(f"{prefix}.{f.name}: must be {text}{' or null' if nullable else ''}, got {value}")
    return problems


def build_section(cls, raw, prefix: str, problems: list[str]):
    """An instance of dataclass `cls` from a mapping; unknown keys and wrong types become problems."""
    hints = typing.get_type_hints(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: expected a mapping of keys, got {shown(raw)}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = list(fields)
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {prefix}.{guess[0]}?" if guess else f"; known keys: {', '.join(known)}"
            problems.append(f"{dotted}: unknown key{hint}")
            continue
        parse = fields[key].metadata.get("parse")
        coerced = parse(value, dotted, problems) if parse else coerce(value, hints[key], dotted, problems)
        if coerced is not None or value is None and type(None) in typing.get_args(hints[key]):
            values[key] = coerced
    return cls(**values)


def apply_override(data: dict, override: str, problems: list[str]) -> None:
    """Put one `section.key=value` from the command line into the raw mapping."""
    if "=" not in override:
        problems.append(f"--set {override}: expected dotted.key=value, e.g. --set training.max_steps=100")
        return
    dotted, _, text = override.partition("=")
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        problems.append(f"--set {override}: expected section.key=value, e.g. --set optimization.learning_rate=2e-4")
        return
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        problems.append(f"--set {override}: section {parts[0]} is not a mapping in the file")
        return
    section[parts[1]] = value
