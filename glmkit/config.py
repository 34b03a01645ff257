"""One typed config for every script: `training_config.yaml` loaded into dataclasses.

Every problem in a file (unknown keys, wrong types, out-of-range values, contradictions)
is collected and reported together, one line each, naming the dotted key and the fix.
Relative paths resolve against the folder of the config file, so the trainer, the
launcher, auto-resume and the dashboard always agree on where things live.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml


class ConfigError(ValueError):
    """Bad configuration; the message holds one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ModelSection:
    name_or_path: str = "zai-org/GLM-4.5-Air"
    revision: str = "main"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class PathsSection:
    model_dir: str = "models/GLM-4.5-Air"
    data_path: str = "data/train.jsonl"
    output_dir: str = "runs/glm45-air-cpt-qlora"
    best_adapter_dir: str = "runs/best-glm45-adapter"
    scratch_dir: str = "scratch"


@dataclass
class TrainingSection:
    epochs: int = 1
    max_steps: Optional[int] = None
    seed: int = 42
    max_seq_length: int = 4096
    val_fraction: float = 0.1
    text_field: str = "text"
    packing: bool = True
    padding: Literal["longest", "max_length"] = "longest"
    skip_bad_lines: bool = False
    max_nan_skips: int = 10


@dataclass
class OptimizationSection:
    micro_batch_per_gpu: int = 1
    grad_accum_steps: int = 16
    learning_rate: float = 1e-4
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    target_parameters: list[str] = field(default_factory=list)


@dataclass
class QuantizationSection:
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quantize_experts: bool = True
    blocksize: int = 64


@dataclass
class LoggingSection:
    log_interval: int = 1
    eval_interval: int = 100
    checkpoint_interval: int = 200
    keep_top_k: int = 3
    expert_stats_interval: int = 50


@dataclass
class MemorySection:
    gradient_checkpointing: bool = True


@dataclass
class PerformanceSection:
    tf32: bool = True
    pin_memory: bool = True
    num_workers: int = 0


@dataclass
class DistributedSection:
    num_processes: Optional[int] = None
    accelerate_config: Optional[str] = None
    gpu_memory_gb: float = 141.0


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    paths: PathsSection = field(default_factory=PathsSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    lora: LoraSection = field(default_factory=LoraSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    memory: MemorySection = field(default_factory=MemorySection)
    performance: PerformanceSection = field(default_factory=PerformanceSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    # Where the YAML came from; relative paths were resolved against its folder.
    source_path: Optional[str] = None

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.paths.output_dir, "logs")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source_path")
        return data


# Shipped Accelerate configs that `distributed.accelerate_config` may name by short name.
ACCELERATE_CONFIGS = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml", "deepspeed_zero3": "deepspeed_zero3.yaml"}
KIT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Loading: YAML -> dict -> dataclasses, with every type problem collected.
# ---------------------------------------------------------------------------

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, key: str, problems: list[str]):
    """Return `value` as type `tp`, or append a problem and return None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(value, inner, key, problems)
    ok = True
    if origin is Literal:
        ok = value in typing.get_args(tp)
        if not ok:
            problems.append(f"{key}: {value!r} is not allowed; use one of {_type_name(tp)}")
            return None
        return value
    if origin is list:
        if isinstance(value, str):  # a single name is a list of one
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
            return None
        return list(value)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str) and value != ""
    if not ok:
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    return value


def _build_section(cls, raw, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: expected a mapping of keys, got {raw!r}")
        return cls()
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {prefix}.{guess[0]}?" if guess else f"; known keys: {', '.join(known)}"
            problems.append(f"{dotted}: unknown key{hint}")
            continue
        coerced = _coerce(value, hints[key], dotted, problems)
        if coerced is not None or value is None and type(None) in typing.get_args(hints[key]):
            values[key] = coerced
    return cls(**values)


def _apply_override(data: dict, override: str, problems: list[str]) -> None:
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


def load_config(path: str | os.PathLike, overrides: typing.Iterable[str] = ()) -> Config:
    """Load, override, resolve and validate; raise ConfigError listing every problem."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ConfigError([f"config: {path} does not exist; pass --config PATH to a YAML file"])
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"config: {path} is not valid YAML{where}; fix the syntax there"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"config: {path} must be a mapping of sections (model:, paths:, training:, ...)"])
    problems: list[str] = []
    for override in overrides:
        _apply_override(data, override, problems)
    return config_from_dict(data, base_dir=os.path.dirname(path), source_path=path, problems=problems)


def config_from_dict(data: dict, base_dir: str, source_path: Optional[str] = None,
                     problems: Optional[list[str]] = None) -> Config:
    problems = [] if problems is None else problems
    hints = typing.get_type_hints(Config)
    sections = {}
    section_names = [f.name for f in dataclasses.fields(Config) if f.name != "source_path"]
    for name, raw in data.items():
        if name not in section_names:
            guess = difflib.get_close_matches(str(name), section_names, n=1)
            hint = f"; did you mean {guess[0]}?" if guess else f"; sections are {', '.join(section_names)}"
            problems.append(f"{name}: unknown section{hint}")
            continue
        sections[name] = _build_section(hints[name], raw, name, problems)
    cfg = Config(**sections, source_path=source_path)
    _resolve_paths(cfg, base_dir)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _resolve_paths(cfg: Config, base_dir: str) -> None:
    for f in dataclasses.fields(PathsSection):
        value = getattr(cfg.paths, f.name)
        if isinstance(value, str):
            setattr(cfg.paths, f.name, os.path.normpath(os.path.join(base_dir, os.path.expanduser(value))))
    acc = cfg.distributed.accelerate_config
    if acc and acc not in ACCELERATE_CONFIGS:
        cfg.distributed.accelerate_config = os.path.normpath(os.path.join(base_dir, os.path.expanduser(acc)))


# ---------------------------------------------------------------------------
# Validation: ranges and contradictions. Each line names the key and the fix.
# ---------------------------------------------------------------------------

def validate(cfg: Config) -> list[str]:
    problems: list[str] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    t, o, lo, q, lg = cfg.training, cfg.optimization, cfg.lora, cfg.quantization, cfg.logging
    need(t.epochs >= 1, "training.epochs", f"must be >= 1, got {t.epochs}")
    need(t.max_steps is None or t.max_steps >= 1, "training.max_steps", f"must be >= 1 or null, got {t.max_steps}")
    need(t.seed >= 0, "training.seed", f"must be >= 0, got {t.seed}")
    need(t.max_seq_length >= 8, "training.max_seq_length", f"must be >= 8 tokens, got {t.max_seq_length}")
    need(0.0 <= t.val_fraction < 1.0, "training.val_fraction", f"must be in [0, 1), got {t.val_fraction}")
    need(t.max_nan_skips >= 1, "training.max_nan_skips", f"must be >= 1, got {t.max_nan_skips}")
    need(o.micro_batch_per_gpu >= 1, "optimization.micro_batch_per_gpu", f"must be >= 1, got {o.micro_batch_per_gpu}")
    need(o.grad_accum_steps >= 1, "optimization.grad_accum_steps", f"must be >= 1, got {o.grad_accum_steps}")
    need(o.learning_rate > 0, "optimization.learning_rate", f"must be > 0, got {o.learning_rate}")
    need(o.warmup_steps >= 0, "optimization.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(0.0 <= o.min_lr_ratio <= 1.0, "optimization.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    need(o.weight_decay >= 0, "optimization.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(0.0 <= o.adam_beta1 < 1.0, "optimization.adam_beta1", f"must be in [0, 1), got {o.adam_beta1}")
    need(0.0 <= o.adam_beta2 < 1.0, "optimization.adam_beta2", f"must be in [0, 1), got {o.adam_beta2}")
    need(o.adam_epsilon > 0, "optimization.adam_epsilon", f"must be > 0, got {o.adam_epsilon}")
    need(o.max_grad_norm > 0, "optimization.max_grad_norm", f"must be > 0, got {o.max_grad_norm}")
    need(lo.r >= 1, "lora.r", f"must be >= 1, got {lo.r}")
    need(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    need(bool(lo.target_modules or lo.target_parameters), "lora.target_modules",
         "LoRA needs at least one target; list modules such as q_proj, v_proj")
    need(q.blocksize in (64, 128, 256, 512, 1024, 2048, 4096), "quantization.blocksize",
         f"must be a power of two in 64..4096, got {q.blocksize}")
    need(not q.quantize_experts or q.load_in_4bit, "quantization.quantize_experts",
         "needs quantization.load_in_4bit: true (or set quantize_experts: false)")
    for key in ("log_interval", "eval_interval", "checkpoint_interval", "expert_stats_interval"):
        need(getattr(lg, key) >= 1, f"logging.{key}", f"must be >= 1, got {getattr(lg, key)}")
    need(lg.keep_top_k >= 1, "logging.keep_top_k", f"must be >= 1, got {lg.keep_top_k}")
    need(lg.eval_interval < 1 or lg.checkpoint_interval % lg.eval_interval == 0, "logging.checkpoint_interval",
         f"must be a multiple of logging.eval_interval ({lg.eval_interval}) so every checkpoint has a "
         f"val loss to rank it by, got {lg.checkpoint_interval}")
    need(cfg.performance.num_workers >= 0, "performance.num_workers", f"must be >= 0, got {cfg.performance.num_workers}")
    d = cfg.distributed
    need(d.num_processes is None or d.num_processes >= 1, "distributed.num_processes",
         f"must be >= 1 or null (= all visible GPUs), got {d.num_processes}")
    need(d.gpu_memory_gb > 0, "distributed.gpu_memory_gb", f"must be > 0, got {d.gpu_memory_gb}")
    if d.accelerate_config and d.accelerate_config not in ACCELERATE_CONFIGS:
        need(os.path.isfile(d.accelerate_config), "distributed.accelerate_config",
             f"{d.accelerate_config} does not exist; use one of {', '.join(ACCELERATE_CONFIGS)} or a path")
    p = cfg.paths
    need(p.best_adapter_dir != p.output_dir, "paths.best_adapter_dir", "must differ from paths.output_dir")
    return problems


def accelerate_config_path(cfg: Config) -> Optional[str]:
    """The Accelerate config file to launch with (None: DDP with accelerate's defaults)."""
    acc = cfg.distributed.accelerate_config
    if acc in ACCELERATE_CONFIGS:
        return os.path.join(KIT_ROOT, "configs", "accelerate", ACCELERATE_CONFIGS[acc])
    return acc


def strategy(cfg: Config) -> str:
    """ddp | fsdp | deepspeed_zero3, read from the chosen Accelerate config."""
    acc = cfg.distributed.accelerate_config
    if acc is None or acc in ACCELERATE_CONFIGS:
        return acc or "ddp"
    try:
        with open(acc, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return "ddp"
    kind = str(data.get("distributed_type", "")).upper()
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return "deepspeed_zero3"
    return "ddp"


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


# ---------------------------------------------------------------------------
# Command line: --config PATH and repeatable --set dotted.key=value.
# ---------------------------------------------------------------------------

DEFAULT_CONFIG = os.path.join(KIT_ROOT, "training_config.yaml")


def add_config_arguments(parser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: training_config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set training.max_steps=100 (repeatable)")


def config_from_args(args) -> Config:
    """Load the config named on the command line, or exit 2 with one line per problem."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
