"""The config's schema: every section of `training_config.yaml` as a dataclass, every key with its default,
what it does and trades off, its bounds and its resume rule (`setting`, glmkit/config/parse.py).

The other jobs live beside it, one a module: loading a file into these classes (load.py), the rules between
keys (validate.py), the keys a checkpoint depends on (keys.py), the launch strategies (strategy.py), the
command line (cli.py) and the docs' configuration table (docs_table.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from glmkit.config.parse import build_section, setting
from glmkit.config.yaml_file import shown


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


# ---------------------------------------------------------------------------
# Chat data: the keys a training source (paths.data_path[i]) and an eval set (eval.sets[i]) share
# ---------------------------------------------------------------------------

CHAT_FIELDS = {
    "format": dict(default="text", help="`text` (each row's `training.text_field`, every token trained) · `chat` "
                                        "(each row's `messages`, rendered with the model's chat template; "
                                        "docs/CHAT_DATA.md)"),
    "train_on": dict(default="assistant", help="chat: the tokens the loss trains on: `assistant` (every assistant "
                                               "turn and the marker or EOS that ends it) · `last_assistant` · `all`"),
    "long_conversations": dict(default="split", help="chat: a conversation longer than training.max_seq_length is "
                                                     "`split` at user turns into conversations that fit, or `drop`ped; "
                                                     "both are counted in run_start"),
}


def chat_key_problems(item: dict, where: str) -> list[str]:
    """A chat-only key on a text source would be silently ignored: refuse it, naming the fix."""
    if item.get("format", "text") == "chat":
        return []
    return [f"{where}.{key}: only chat sources read it; add `format: chat` to {where} or remove the key"
            for key in ("train_on", "long_conversations") if key in item]


# Passes per epoch one source may ask for (paths.data_path[i].weight): a pass repeats the source's
# documents in the epoch's row layout, so the layout grows with weight x documents.
MAX_SOURCE_WEIGHT = 1000


@dataclass
class DataSource:
    """One entry of a list-valued `paths.data_path`: a file, folder or glob, and its passes per epoch."""
    path: str = setting(help="a .jsonl / .jsonl.gz / .jsonl.zst / .parquet file, a folder of them, or a glob")
    weight: float = setting(1.0, "passes over this source per epoch; a fraction takes a deterministic subset "
                                 "of its documents", gt=0, le=MAX_SOURCE_WEIGHT)
    # ---- chat data (glmkit/data/chat.py, docs/CHAT_DATA.md) ----
    format: Literal["text", "chat"] = setting(**CHAT_FIELDS["format"])
    train_on: Literal["assistant", "last_assistant", "all"] = setting(**CHAT_FIELDS["train_on"])
    long_conversations: Literal["split", "drop"] = setting(**CHAT_FIELDS["long_conversations"])


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
            problems.extend(chat_key_problems(item, where))
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
        "of `{path, weight}` sources (docs/DATA.md)", parse=_parse_data_path,
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
    # ---- chat data: as a training source's; a chat set's loss is over its trained tokens ----
    format: Literal["text", "chat"] = setting(**CHAT_FIELDS["format"])
    train_on: Literal["assistant", "last_assistant", "all"] = setting(**CHAT_FIELDS["train_on"])
    long_conversations: Literal["split", "drop"] = setting(**CHAT_FIELDS["long_conversations"])


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
        problems.extend(chat_key_problems(item, where))
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
        help="Linear modules to adapt: `attention` = every projection of the model's attention (q/k/v/o_proj on "
             "GLM-4.5-Air, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj on GLM-4.7-Flash), or names; "
             "shared experts and the dense MLP (gate_proj, up_proj, down_proj) optional",
        factory=lambda: ["attention"], critical=True)
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
    """Records, evals and where they go."""
    log_interval: int = setting(1, "steps per training record", ge=1)
    eval_interval: int = setting(100, "steps per validation pass", ge=1)
    expert_stats_interval: int = setting(50, "steps per expert-usage record", ge=1)
    report_to: list[str] = setting(
        help="experiment trackers fed the same records as the JSONL: `tensorboard` · `wandb` · `mlflow` · "
        "`trackio` (docs/LOGS.md); a failing tracker costs a warning, never the run", factory=list)
    tracker_project: str = setting("glm45-air-cpt", "W&B project, MLflow experiment, trackio project")
    run_name: Optional[str] = setting(None, "the run's name in the trackers; null = the `output_dir` folder name")


@dataclass
class CheckpointSection:
    """When checkpoints are written and how many are kept (until 2026-12 these were `logging.checkpoint_interval`
    and `logging.keep_top_k`; glmkit/config/load.py still reads those, with a notice)."""
    interval: int = setting(200, "steps per checkpoint; a multiple of `logging.eval_interval`, so each is ranked by "
                                 "a val loss; shorter = less work lost to a crash, more disk and time", ge=1)
    keep_top_k: int = setting(3, "checkpoints kept by val loss (plus the latest, always)", ge=1)


@dataclass
class MemorySection:
    """Activation memory."""
    gradient_checkpointing: bool = setting(True, "non-reentrant activation checkpointing")
    offload_activations: bool = setting(
        False, "CUDA only: keep the layer inputs checkpointing saves in pinned host memory instead of on the GPU "
        "(frees (layers - 1) x tokens x hidden x 2 bytes per GPU, 12.1 GB at 32k tokens per GPU on GLM-4.5-Air) for "
        "a copy each way per layer: a slower step; needs `gradient_checkpointing`")


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
    sequence_parallel: Literal[1, 2, 4, 8] = setting(
        1, "processes that share each row, each holding length/P of its tokens (Ulysses: an all-to-all over the "
        "heads around attention): activation memory per GPU / P for P x fewer rows per step; must divide the "
        "KV heads and the processes; needs `model.attn_implementation: varlen` (docs/LONG_CONTEXT.md)")


# Config's fields that are not sections of the file.
NOT_SECTIONS = ("source_path", "notices")


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
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    memory: MemorySection = field(default_factory=MemorySection)
    performance: PerformanceSection = field(default_factory=PerformanceSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    # Where the YAML came from; relative paths were resolved against its folder.
    source_path: Optional[str] = None
    # One line each for the user, not problems: e.g. a key read under its old name (glmkit/config/load.py).
    notices: list[str] = field(default_factory=list)

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.paths.output_dir, "logs")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in NOT_SECTIONS:
            data.pop(name)
        return data


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


def eval_set_names(cfg: Config) -> list[str]:
    """Every set an eval measures, in order: the held-out split (when there is one), then eval.sets."""
    return ([HELD_OUT_SET] if cfg.training.val_fraction > 0 else []) + [s.name for s in cfg.eval.sets]
