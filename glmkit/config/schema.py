"""One typed config for every script: `training_config.yaml` loaded into dataclasses.

Every problem in a file (unknown keys, wrong types, out-of-range values, contradictions)
is collected and reported together, one line each, naming the dotted key and the fix.
Relative paths resolve against the folder of the config file, so the trainer, the
launcher, auto-resume and the dashboard always agree on where things live.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import re
import stat
import sys
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from glmkit.config.parse import apply_override, bound_problems, bounds_text, build_section, field_default, setting
from glmkit.config.yaml_file import YamlFileError, load_yaml_file, shown


class ConfigError(ValueError):
    """Bad configuration; the message holds one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ModelSection:
    """The base model."""
    name_or_path: str = setting("zai-org/GLM-4.5-Air", "Hub id that download_model.py fetches", critical=True)
    revision: str = setting("main", "branch, tag or commit; pin a commit hash for reproducible runs", critical=True)
    attn_implementation: Literal["varlen", "sdpa", "eager", "flash_attention_2"] = setting(
        "varlen", "`varlen` (packed rows as segment boundaries: torch's flash-attention varlen kernel on CUDA in "
        "bf16, per-document sdpa elsewhere; causal per document, no mask) · `sdpa` (block-diagonal 4-D mask: the "
        "whole row's square) · `flash_attention_2` (only where the `flash-attn` package imports) · `eager` "
        "(debugging)")


# Passes per epoch one source may ask for (paths.data_path[i].weight): a pass repeats the source's
# documents in the epoch's row layout, so the layout grows with weight x documents.
MAX_SOURCE_WEIGHT = 1000


@dataclass
class DataSource:
    """One entry of a list-valued `paths.data_path`: a file, folder or glob, and its passes per epoch."""
    path: str = setting(help="a .jsonl / .jsonl.gz / .jsonl.zst / .parquet file, a folder of them, or a glob")
    weight: float = setting(1.0, "passes over this source per epoch; a fraction takes a deterministic subset "
                                 "of its documents", gt=0, le=MAX_SOURCE_WEIGHT)


def _parse_data_path(value, key: str, problems: list[str]):
    """A path string, or a list of sources: each a path string (weight 1) or a {path, weight} mapping."""
    if isinstance(value, str) and value:
        return value
    if not isinstance(value, list) or not value:
        problems.append(f"{key}: expected a path, a glob, or a list of sources like [{{path: data/a/, weight: 1}}], "
                        f"got {shown(value)}")
        return None
    sources = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if isinstance(item, str) and item:
            sources.append(DataSource(path=item))
        elif isinstance(item, dict):
            if not isinstance(item.get("path"), str) or not item["path"]:
                problems.append(f"{where}.path: missing or not a string; each source is "
                                f"{{path: FILE|FOLDER|GLOB, weight: N}}")
                continue
            before = len(problems)
            source = build_section(DataSource, item, where, problems)
            if len(problems) == before:
                sources.append(source)
        else:
            problems.append(f"{where}: expected a path or {{path: ..., weight: N}}, got {shown(item)}")
    return sources if len(sources) == len(value) else None


@dataclass
class PathsSection:
    """Where things live; relative paths resolve against the config file's folder."""
    model_dir: str = setting("models/GLM-4.5-Air", "the checkpoint folder download_model.py fills", critical=True)
    data_path: typing.Union[str, list[DataSource]] = setting(
        "data/train.jsonl", "a `.jsonl` / `.jsonl.gz` / `.jsonl.zst` / `.parquet` file, a folder, a glob, or a list "
        "of `{path, weight}` sources (README: Inputs and the data cache)", parse=_parse_data_path,
        on_resume="data fingerprint")
    output_dir: str = setting("runs/glm45-air-cpt-qlora", "checkpoints and `logs/`; the dashboard and auto-resume read here")
    best_adapter_dir: str = setting("runs/best-glm45-adapter",
                                    "copy of the adapter with the best val loss, replaced atomically; "
                                    "must be empty, new, or a previous best adapter")
    scratch_dir: str = setting("scratch", "caches, TMPDIR and the tokenized-data cache: fast local disk")
    tracker_dir: Optional[str] = setting(
        None, "local tracker files (TensorBoard events, W&B offline runs, MLflow sqlite, trackio); "
        "null = `<output_dir>/trackers`; WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_DIR win when set")


@dataclass
class TrainingSection:
    """What is trained on, and for how long."""
    epochs: int = setting(1, "passes over the data when `max_steps` is null", ge=1)
    max_steps: Optional[int] = setting(None, "optimizer steps; null derives them from `epochs`", ge=1)
    seed: int = setting(42, "data split, shuffle order and LoRA init", critical=True, ge=0)
    max_seq_length: int = setting(4096, "tokens per row; activation memory grows linearly with it",
                                  critical=True, ge=8)
    val_fraction: float = setting(0.01, "held-out share of documents; bigger = steadier val loss, slower evals",
                                  critical=True, ge=0, lt=1)
    text_field: str = setting("text", "JSON key holding each document", critical=True)
    packing: bool = setting(True, "pack documents end to end into full rows (kept apart by segment boundaries or "
                                  "a block-diagonal mask)", critical=True)
    padding: Literal["longest", "max_length"] = setting(
        "longest", "without packing: `longest` (less waste) or `max_length` (the original recipe)", critical=True)
    skip_bad_lines: bool = setting(False, "skip and count bad JSONL lines instead of aborting")
    max_nan_skips: int = setting(10, "consecutive non-finite steps skipped before the run aborts", ge=1)


HELD_OUT_SET = "val"  # the eval set drawn from the training data by training.val_fraction
EVAL_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class EvalSetSource:
    """One named eval set: documents evaluated on, never trained on (e.g. general text, to see forgetting)."""
    name: str = setting(help="its name in eval_log.jsonl, the trackers (`eval/<name>/loss`) and the dashboard")
    path: str = setting(help="a .jsonl / .jsonl.gz / .jsonl.zst / .parquet file, a folder of them, or a glob")


def _parse_eval_sets(value, key: str, problems: list[str]):
    """A list of {name, path} mappings."""
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        problems.append(f"{key}: expected a list like [{{name: general, path: data/general.jsonl}}], got {value!r}")
        return None
    sets = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item.get(k) for k in ("name", "path")):
            problems.append(f"{where}: expected {{name: NAME, path: FILE|FOLDER|GLOB}}, got {item!r}")
            continue
        before = len(problems)
        entry = build_section(EvalSetSource, item, where, problems)
        if len(problems) == before:
            sets.append(entry)
    return sets if len(sets) == len(value) else None


@dataclass
class EvalSection:
    """What each evaluation measures, when the first one runs, and which set picks the best adapter."""
    sets: list[EvalSetSource] = setting(
        help="named eval sets besides the held-out split `val`: `[{name, path}]`, each tokenized and cached like "
             "the training data and refused if it shares documents with it; more sets = a longer eval",
        factory=list, parse=_parse_eval_sets)
    at_start: bool = setting(True, "evaluate every set at step 0, before the first update: the base model's "
                                   "loss, each curve's baseline; false saves one eval's time")
    select_by: str = setting(HELD_OUT_SET, "the eval set whose loss picks the best adapter and the top-K "
                                           "checkpoints: `val` (the held-out split) or a name in `eval.sets`")


@dataclass
class OptimizationSection:
    """Batch geometry, AdamW and the learning-rate schedule."""
    micro_batch_per_gpu: int = setting(
        4, "rows per forward; memory grows with it, and more rows amortize dequantizing the experts each "
        "micro-step; `--plan` reports the largest that fits (`max_micro_batch_per_gpu`)", critical=True, ge=1)
    grad_accum_steps: int = setting(4, "micro-batches per optimizer step (4 × 4 = the 16 rows per GPU of a 1 × 16 "
                                    "recipe)", critical=True, ge=1)
    learning_rate: float = setting(1e-4, "peak LR (LoRA)", gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "wsd"] = setting(
        "cosine", "`cosine` · `linear` · `constant` after warmup · `wsd` (warmup, a stable phase at the peak, "
        "then a decay over the final steps: a run can be extended from its last stable checkpoint)")
    warmup_steps: int = setting(50, "linear warmup from 0", ge=0)
    min_lr_ratio: float = setting(0.1, "decay floor as a share of the peak", ge=0, le=1)
    decay_fraction: float = setting(0.1, "wsd: the share of all steps spent decaying (used when `decay_steps` is "
                                         "null); longer decays cost stable-phase steps", gt=0, le=1)
    decay_steps: Optional[int] = setting(None, "wsd: the number of final steps spent decaying; null = "
                                               "`decay_fraction` of the run", ge=1)
    decay_shape: Literal["linear", "cosine", "sqrt"] = setting(
        "linear", "wsd decay from the peak to the floor: `linear` · `cosine` · `sqrt` (1 - sqrt: drops fast, "
        "then flattens)")
    weight_decay: float = setting(0.0, "AdamW decay on the LoRA weights", ge=0)
    adam_beta1: float = setting(0.9, "AdamW first-moment decay", ge=0, lt=1)
    adam_beta2: float = setting(0.999, "AdamW second-moment decay", ge=0, lt=1)
    adam_epsilon: float = setting(1e-8, "AdamW denominator floor", gt=0)
    max_grad_norm: float = setting(1.0, "gradient clipping", gt=0)


@dataclass
class LoraSection:
    """The adapter."""
    r: int = setting(16, "adapter rank: capacity vs parameters and optimizer memory", critical=True, ge=1)
    alpha: int = setting(32, "scale = alpha / r", critical=True, gt=0)
    dropout: float = setting(0.05, "dropout on the adapter input; 0 for fully deterministic runs", ge=0, lt=1)
    target_modules: list[str] = setting(
        help="Linear modules to adapt (q/k/v/o_proj; shared experts and the dense MLP optional)",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], critical=True)
    target_parameters: list[str] = setting(
        help="fused routed-expert parameters to adapt (mlp.experts.gate_up_proj, mlp.experts.down_proj); "
             "needs dropout 0", factory=list, critical=True)
    expert_r: Optional[int] = setting(
        None, "rank of the routed-expert adapters (null = `r`): each MoE layer adds experts x rank x "
              "(2 hidden + 3 moe_intermediate) weights", critical=True, ge=1)
    expert_alpha: Optional[int] = setting(None, "alpha of the routed-expert adapters (null = `alpha`); "
                                                "scale = expert_alpha / expert_r", critical=True, gt=0)


@dataclass
class MtpSection:
    """The multi-token-prediction layer (GLM's speculative-decoding draft head): measured always, trained on request."""
    train: bool = setting(
        False, "LoRA on the MTP layer (lora's targets, experts included) trained on its own loss, so speculative "
               "decoding keeps accepting drafts after CPT; costs one more decoder layer and lm_head pass per "
               "micro-step and that layer's LoRA memory", critical=True)
    loss_weight: float = setting(0.3, "the MTP loss's weight beside the language-modelling loss (each a mean over "
                                      "its own target tokens); with grad_to_trunk it trades the trunk's loss for "
                                      "acceptance", gt=0, le=10)
    grad_to_trunk: bool = setting(False, "the MTP loss's gradient also reaches the trunk's LoRA (DeepSeek-V3's joint "
                                         "objective); false: the trunk learns from the language-modelling loss alone "
                                         "and only the MTP layer follows it")


@dataclass
class QuantizationSection:
    """How the frozen base is stored."""
    load_in_4bit: bool = setting(True, "4-bit base weights", critical=True)
    quant_type: Literal["nf4", "fp4"] = setting("nf4", "`nf4` · `fp4`", critical=True)
    double_quant: bool = setting(True, "quantize the absmax constants too", critical=True)
    compute_dtype: Literal["bfloat16", "float16", "float32"] = setting(
        "bfloat16", "`bfloat16` · `float16` · `float32` (CPU tests)", critical=True)
    quantize_experts: bool = setting(True, "fused routed experts in 4-bit", critical=True)
    blocksize: Literal[64, 128, 256, 512, 1024, 2048, 4096] = setting(64, "values per quantization block",
                                                                       critical=True)


@dataclass
class LoggingSection:
    """Records, evals and checkpoints."""
    log_interval: int = setting(1, "steps per training record", ge=1)
    eval_interval: int = setting(100, "steps per validation pass", ge=1)
    checkpoint_interval: int = setting(200, "steps per checkpoint; a multiple of `eval_interval`", ge=1)
    keep_top_k: int = setting(3, "checkpoints kept by val loss (plus the latest)", ge=1)
    expert_stats_interval: int = setting(50, "steps per expert-usage record", ge=1)
    report_to: list[str] = setting(
        help="experiment trackers fed the same records as the JSONL: `tensorboard` · `wandb` · `mlflow` · "
        "`trackio` (see Experiment trackers); a failing tracker costs a warning, never the run", factory=list)
    tracker_project: str = setting("glm45-air-cpt", "W&B project, MLflow experiment, trackio project")
    run_name: Optional[str] = setting(None, "the run's name in the trackers; null = the `output_dir` folder name")


@dataclass
class MemorySection:
    """Activation memory."""
    gradient_checkpointing: bool = setting(True, "non-reentrant activation checkpointing")


@dataclass
class PerformanceSection:
    """Kernel precision and the data loader."""
    tf32: bool = setting(True, "TF32 matmuls for fp32 ops on CUDA")
    pin_memory: bool = setting(True, "pinned host memory for batch copies")
    num_workers: int = setting(0, "data loader workers per process", ge=0)
    tokenizer_workers: Optional[int] = setting(None, "processes that tokenize the corpus when it is prepared; "
                                                     "null = every core", ge=1)


@dataclass
class DistributedSection:
    """Processes, strategy and the memory the plan checks against."""
    num_processes: Optional[int] = setting(None, "processes per machine (null = visible GPUs)", ge=1)
    accelerate_config: Optional[str] = setting(None, "`ddp` (a 4-bit replica per GPU) · `fsdp` (FSDP2, every "
                                                     "state sharded; resumable at another world size) · a path")
    gpu_memory_gb: float = setting(141.0, "memory the plan's verdict checks against", gt=0)


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    paths: PathsSection = field(default_factory=PathsSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    lora: LoraSection = field(default_factory=LoraSection)
    mtp: MtpSection = field(default_factory=MtpSection)
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
ACCELERATE_CONFIGS = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml"}
# Offered once, never made to work with the 4-bit experts: refused at load, pointing at fsdp.
REMOVED_STRATEGIES = {"deepspeed_zero3": "DEEPSPEED"}
# Tracker name -> modules it needs. The pinned pip lines live in requirements-trackers.txt,
# each marked "# for: <tracker>"; the error for a missing one quotes them.
TRACKERS = {
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),  # the last two for the local sqlite store
    "trackio": ("trackio",),
}
# The checkout's root: glmkit/config/schema.py is three levels below it.
KIT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------
# Loading: YAML -> dict -> dataclasses, with every problem collected.
# ---------------------------------------------------------------------------

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
    if isinstance(cfg.paths.data_path, list):  # glob characters pass through unchanged
        for source in cfg.paths.data_path:
            source.path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(source.path)))
    for entry in cfg.eval.sets:
        entry.path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(entry.path)))
    acc = cfg.distributed.accelerate_config
    if acc and acc not in ACCELERATE_CONFIGS and acc not in REMOVED_STRATEGIES:
        cfg.distributed.accelerate_config = os.path.normpath(os.path.join(base_dir, os.path.expanduser(acc)))


# ---------------------------------------------------------------------------
# Validation: declared bounds, then contradictions. Each line names the key and the fix.
# ---------------------------------------------------------------------------

def _contains(outer: str, inner: str) -> bool:
    """True if `inner` is `outer` or lies inside it (paths are already absolute and normalised)."""
    outer, inner = os.path.realpath(outer), os.path.realpath(inner)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def validate(cfg: Config) -> list[str]:
    problems: list[str] = []
    for name in section_names():
        problems.extend(bound_problems(getattr(cfg, name), name))

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    lo, q, lg = cfg.lora, cfg.quantization, cfg.logging
    need(cfg.model.attn_implementation != "flash_attention_2" or flash_attn_importable(),
         "model.attn_implementation", "flash_attention_2 needs the flash-attn package, which does not import "
         "here; use varlen (torch's own flash-attention varlen kernel, nothing to install)")
    need(bool(lo.target_modules or lo.target_parameters), "lora.target_modules",
         "LoRA needs at least one target; list modules such as q_proj, v_proj")
    # peft's LoRA on a 3-D parameter adds B_e A_e to the weight, which has no place for dropout on the
    # input; an adapter saved with dropout > 0 and target_parameters can't even be loaded by PeftModel.
    need(not lo.target_parameters or lo.dropout == 0, "lora.dropout",
         f"must be 0 when lora.target_parameters is set (LoRA on the fused expert parameters has no dropout), "
         f"got {lo.dropout}")
    need(not q.quantize_experts or q.load_in_4bit, "quantization.quantize_experts",
         "needs quantization.load_in_4bit: true (or set quantize_experts: false)")
    problems.extend(tracker_name_problems(lg.report_to))
    need(lg.eval_interval < 1 or lg.checkpoint_interval % lg.eval_interval == 0, "logging.checkpoint_interval",
         f"must be a multiple of logging.eval_interval ({lg.eval_interval}) so every checkpoint has a "
         f"val loss to rank it by, got {lg.checkpoint_interval}")
    problems.extend(eval_problems(cfg))
    problems.extend(mtp_problems(cfg))
    o = cfg.optimization
    if o.lr_scheduler == "wsd" and o.decay_steps and cfg.training.max_steps:
        need(o.warmup_steps + o.decay_steps <= cfg.training.max_steps, "optimization.decay_steps",
             f"warmup ({o.warmup_steps}) plus decay ({o.decay_steps}) exceeds training.max_steps "
             f"({cfg.training.max_steps}); shorten the decay or the warmup")
    d = cfg.distributed
    if d.accelerate_config in REMOVED_STRATEGIES:
        need(False, "distributed.accelerate_config",
             f"{d.accelerate_config} is no longer offered (ZeRO-3 could not partition the kit's 4-bit experts, and "
             f"it was never tested); use fsdp, which shards every 4-bit layer")
    elif d.accelerate_config and d.accelerate_config not in ACCELERATE_CONFIGS:
        need(os.path.isfile(d.accelerate_config), "distributed.accelerate_config",
             f"{d.accelerate_config} does not exist; use one of {', '.join(ACCELERATE_CONFIGS)} or a path")
        kind = _accelerate_distributed_type(d.accelerate_config)
        need(kind not in ("DEEPSPEED", "FSDP"), "distributed.accelerate_config",
             f"{d.accelerate_config} asks Accelerate for {kind}; the kit shards the 4-bit model itself: set "
             f"distributed.accelerate_config: fsdp (FSDP2 with every 4-bit layer sharded), or give a MULTI_GPU config")
    if isinstance(cfg.paths.data_path, list):
        for index, source in enumerate(cfg.paths.data_path):
            need(source.weight > 0, f"paths.data_path[{index}].weight",
                 f"must be > 0 (passes over {source.path} per epoch; remove the source to leave it out), "
                 f"got {source.weight}")
            # Each pass is a copy of the source's documents in the epoch's row layout: bound it.
            need(not source.weight > MAX_SOURCE_WEIGHT, f"paths.data_path[{index}].weight",
                 f"must be <= {MAX_SOURCE_WEIGHT} (passes over {source.path} per epoch), got {source.weight:g}; "
                 f"lower it, or the weights of the other sources instead")
    # Folders the kit writes into: never a filesystem root, and the run never inside the downloaded model.
    for key in ("output_dir", "best_adapter_dir", "scratch_dir"):
        folder = getattr(cfg.paths, key)
        need(os.path.dirname(folder) != folder, f"paths.{key}",
             f"is the filesystem root {folder}; the kit writes (and replaces) files there: name a folder of its own, "
             f"e.g. runs/my-run")
    out, model = cfg.paths.output_dir, cfg.paths.model_dir
    if os.path.dirname(out) != out and _contains(model, out):
        where = "is" if os.path.realpath(out) == os.path.realpath(model) else "lies inside"
        problems.append(f"paths.output_dir: {out} {where} paths.model_dir ({model}); checkpoints and logs would mix "
                        f"with the base model's files: put the run in a folder of its own, e.g. runs/my-run")
    # The best adapter folder is replaced on every improvement: it must not overlap anything else.
    best = cfg.paths.best_adapter_dir
    data_paths = [s.path for s in cfg.paths.data_path] if isinstance(cfg.paths.data_path, list) else []
    for key, other in [(k, getattr(cfg.paths, k)) for k in ("output_dir", "model_dir", "scratch_dir", "data_path")] + \
            [("data_path", path) for path in data_paths]:
        if isinstance(other, str) and (_contains(best, other) or _contains(other, best)):
            where = "contains" if _contains(best, other) else "lies inside"
            problems.append(f"paths.best_adapter_dir: {best} {where} paths.{key} ({other}); the best adapter "
                            f"folder is replaced on each improvement, so give it a folder of its own")
    return problems


def eval_problems(cfg: Config) -> list[str]:
    """Eval set names (unique, usable as tracker keys) and the selection set."""
    problems, names = [], []
    for index, entry in enumerate(cfg.eval.sets):
        key = f"eval.sets[{index}].name"
        if entry.name == HELD_OUT_SET:
            problems.append(f"{key}: {HELD_OUT_SET!r} is the held-out split's name; give this set another name")
        elif not EVAL_SET_NAME.fullmatch(entry.name):
            problems.append(f"{key}: {entry.name!r} must be letters, digits, '_', '.' or '-' (up to 64), "
                            f"starting with a letter or digit: it becomes the tracker key eval/<name>/loss")
        elif entry.name in names:
            problems.append(f"{key}: {entry.name!r} names two eval sets; give each set its own name")
        names.append(entry.name)
    choices = ([HELD_OUT_SET] if cfg.training.val_fraction > 0 else []) + names
    select = cfg.eval.select_by
    if select == HELD_OUT_SET and cfg.training.val_fraction == 0 and names:
        problems.append(f"eval.select_by: the held-out split {HELD_OUT_SET!r} is empty with training.val_fraction "
                        f"0; select one of {', '.join(names)} or raise training.val_fraction")
    elif select != HELD_OUT_SET and select not in names:
        guess = difflib.get_close_matches(select, choices, n=1)
        hint = f"did you mean {guess[0]}? " if guess else ""
        problems.append(f"eval.select_by: {select!r} is not an eval set; {hint}use "
                        f"{' or '.join(choices) or HELD_OUT_SET + ' (with training.val_fraction > 0)'}")
    return problems


def mtp_problems(cfg: Config) -> list[str]:
    """The MTP keys that only mean something with mtp.train (whether the model has an MTP layer is checked at
    load, glmkit/model/load.py)."""
    if cfg.mtp.grad_to_trunk and not cfg.mtp.train:
        return ["mtp.grad_to_trunk: needs mtp.train: true (without it there is no MTP loss to send to the trunk); "
                "set mtp.train: true or mtp.grad_to_trunk: false"]
    return []


def eval_set_names(cfg: Config) -> list[str]:
    """Every set an eval measures, in order: the held-out split (when there is one), then eval.sets."""
    return ([HELD_OUT_SET] if cfg.training.val_fraction > 0 else []) + [s.name for s in cfg.eval.sets]


def tracker_name_problems(names: list[str]) -> list[str]:
    problems = []
    for name in names:
        if name not in TRACKERS:
            guess = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f"did you mean {guess[0]}? " if guess else ""
            problems.append(f"logging.report_to: {name!r} is not a tracker the kit feeds; {hint}"
                            f"use any of {', '.join(TRACKERS)}")
    return problems


def flatten(config_dict: dict, world_size: int) -> dict:
    """A config dict as flat "section.key" values plus world_size: what checkpoints compare and trackers log."""
    flat = {f"{section}.{key}": value for section, values in config_dict.items() if isinstance(values, dict)
            for key, value in values.items()}
    flat["world_size"] = world_size
    return flat


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name != "source_path"]


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


def _markdown_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    return f"`{value}`" if isinstance(value, str) else repr(value)


def _on_resume(f) -> str:
    return f.metadata.get("on_resume") or ("fixed" if f.metadata.get("critical") else "may change")


def readme_table() -> str:
    """The README's configuration table, rendered from the fields' metadata (`python -m glmkit.config.schema`)."""
    rows = ["| key | default | what it does | valid | on resume |", "|---|---|---|---|---|"]
    for key, f in config_fields():
        rows.append(f"| `{key}` | {_markdown_value(field_default(f))} | {f.metadata.get('help', '')} | "
                    f"{bounds_text(f) or ''} | {_on_resume(f)} |")
    return "\n".join(rows) + "\n"


def flash_attn_importable() -> bool:
    """transformers' flash_attention_2 path needs the flash-attn package; it has no wheel for torch 2.13."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing package and a broken build (ABI, CUDA) both mean "unusable"
        return False
    return True


def accelerate_config_path(cfg: Config) -> Optional[str]:
    """The Accelerate config file to launch with (None: DDP with accelerate's defaults)."""
    acc = cfg.distributed.accelerate_config
    if acc in ACCELERATE_CONFIGS:
        return os.path.join(KIT_ROOT, "configs", "accelerate", ACCELERATE_CONFIGS[acc])
    return acc


def strategy(cfg: Config) -> str:
    """ddp | fsdp: the short name, or ddp for an Accelerate config file (validation refuses FSDP / DeepSpeed ones)."""
    acc = cfg.distributed.accelerate_config
    if acc is None or acc in ACCELERATE_CONFIGS:
        return acc or "ddp"
    return "ddp"


def _accelerate_distributed_type(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return ""
    return str(data.get("distributed_type", "") if isinstance(data, dict) else "").upper()


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


def update_readme(path: str = os.path.join(KIT_ROOT, "README.md")) -> None:
    """Rewrite the README's configuration table from the fields (`python -m glmkit.config.schema --update-readme`)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start = text.index("\n", text.index("<!-- config-table")) + 1
    end = text.index("<!-- /config-table -->")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text[:start] + readme_table() + text[end:])


if __name__ == "__main__":  # prints the README's configuration table, or rewrites it in place
    if sys.argv[1:] == ["--update-readme"]:
        update_readme()
    else:
        print(readme_table(), end="")
