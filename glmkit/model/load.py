"""Model loading: stream GLM-4.5-Air (or GLM-4.7-Flash, ...) in, quantize everything large to 4-bit, add LoRA, audit.

Why not `from_pretrained(quantization_config=BitsAndBytesConfig(...))`: in transformers 5
the routed experts are fused 3-D parameters, which BitsAndBytesConfig does not touch, so
~99.7B parameters would stay bf16 (~200 GB) and `prepare_model_for_kbit_training` would
then upcast them to fp32. Here the skeleton is built on the meta device, and the
checkpoint is streamed in one layer at a time: each layer's experts are fused, quantized
with `bitsandbytes.nn.parametrize.replace_parameter_4bit` and their bf16 copy dropped
before the next layer is read.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

from glmkit.hub.download import SUPPORTED_MODEL_TYPES
from glmkit.model import attention, mtp
from glmkit.model.errors import ModelLoadError
from glmkit.model.sequence_parallel import check_heads, sizes_that_split

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Where every parameter belongs (see group_of); the audit and the memory plan report the same groups.
# The MTP layer (glmkit/model/mtp.py) is a group of its own, whatever its parts: what loading it costs, in one line.
BASE_GROUPS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "router", "embeddings", "lm_head", "norms",
               "mtp")
AUDIT_GROUPS = BASE_GROUPS + ("lora",)

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ---------------------------------------------------------------------------
# Skeleton
# ---------------------------------------------------------------------------

def load_model_config(model_dir: str):
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ModelLoadError(f"{model_dir} has no config.json; run `python download_model.py` "
                             f"(or `python download_model.py --tiny` for the CPU demo model)")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{model_dir} holds a {config.model_type!r} model; this kit trains GLM-4.5-Air, "
                             f"GLM-4.5/4.6/4.7 and GLM-4.7-Flash ({', '.join(SUPPORTED_MODEL_TYPES)})")
    return config


# Set in the tiny model's config.json (glmkit/demo/tiny.py): its output is noise by design, and tools say so.
DEMO_MODEL_KEY = "glmkit_demo_model"


def is_demo_model(model_dir: str) -> bool:
    """True for the tiny CPU demo model that `download_model.py --tiny` writes (random weights, never trained)."""
    import json

    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            return bool(json.load(fh).get(DEMO_MODEL_KEY))
    except (OSError, ValueError, AttributeError):
        return False


def check_model_dir(cfg) -> None:
    """Fail in one line, before anything is loaded, if paths.model_dir can't serve this config."""
    from glmkit.model.lora import resolve_targets

    config = load_model_config(cfg.paths.model_dir)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and cfg.training.max_seq_length > limit:
        raise ModelLoadError(f"training.max_seq_length {cfg.training.max_seq_length} exceeds the model's "
                             f"max_position_embeddings ({limit}) in {cfg.paths.model_dir}; lower it")
    check_sequence_parallel_heads(config, cfg.distributed.sequence_parallel, cfg.paths.model_dir)
    check_shards(cfg)
    check_mtp_layer(cfg, config)
    # The skeleton on the meta device knows every name: a LoRA target that matches nothing fails here.
    resolve_targets(build_skeleton(config, cfg), cfg.lora, train_mtp=cfg.mtp.train)


def check_mtp_layer(cfg, config) -> None:
    """config.json and the weights agree about the MTP layer; `mtp.train` needs one (glmkit/model/mtp.py)."""
    mtp.check_checkpoint(config.to_dict(), _weight_map(cfg), cfg.paths.model_dir)
    if cfg.mtp.train and not mtp.num_mtp_layers(config):
        raise ModelLoadError(f"mtp.train is true but {cfg.paths.model_dir} has no MTP layer (num_nextn_predict_layers "
                             f"0); set mtp.train: false")


def check_sequence_parallel_heads(config, size: int, where: str) -> None:
    """distributed.sequence_parallel must split the model's query and KV heads evenly (glmkit/model/sequence_parallel.py)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    problem = check_heads(heads, kv_heads, size)
    if problem:
        works = sizes_that_split(heads, kv_heads)
        raise ModelLoadError(f"distributed.sequence_parallel: {size}: {problem} ({where}); use "
                             f"{', '.join(map(str, works))}")


def check_activation_offload(cfg, device) -> None:
    """memory.offload_activations copies to pinned host memory from a CUDA GPU; on the CPU it has nothing to
    free, and torch's pinned copy fails there."""
    if cfg.memory.offload_activations and device.type != "cuda":
        raise ModelLoadError(f"memory.offload_activations needs a CUDA GPU (this process runs on {device.type}, "
                             f"where activations are in host memory already): set it to false")


def check_shards(cfg) -> None:
    """Every shard's header against the index (seconds, no tensor data read): damage fails here, in one line."""
    from glmkit.hub.verify import check_weights

    problems = check_weights(cfg.paths.model_dir)
    if problems:
        path, problem = problems[0]
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise ModelLoadError(f"{path}: {problem}{more}; {_verify_hint(cfg)}")


def _verify_hint(cfg) -> str:
    config = f" --config {cfg.source_path}" if cfg.source_path else ""
    return f"`python download_model.py --verify-only{config}` lists every damaged file and how to fix it"


def _quantized_linear_names(model) -> list[str]:
    # lm_head stays in the compute dtype: it is the last layer before the loss and 4-bit
    # there costs accuracy for little memory. The router is an nn.Parameter, not a Linear.
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith("lm_head")]


def _swap_in_linear4bit(model, qcfg, compute_dtype) -> None:
    import bitsandbytes as bnb

    for name in _quantized_linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=qcfg.double_quant,
                                quant_type=qcfg.quant_type, device="meta")
        # bitsandbytes repacks CPU weights for AVX512-BF16 inference the first time a layer runs
        # in eval mode and never packs them back, so training after an eval pass breaks. Keep
        # the canonical layout (this flag is CPU-only; CUDA kernels are unaffected).
        new.support_avx512bf16_for_cpu = False
        setattr(parent, child, new)


def build_skeleton(config, cfg):
    """The model with no storage behind its parameters (buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    compute_dtype = DTYPES[cfg.quantization.compute_dtype]
    if cfg.model.attn_implementation == attention.NAME:
        attention.register()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype,
                                                 attn_implementation=cfg.model.attn_implementation)
        mtp.attach_mtp_layers(model)  # its Linears go 4-bit below and its experts as they load, like a decoder layer's
    if cfg.quantization.load_in_4bit:
        _swap_in_linear4bit(model, cfg.quantization, compute_dtype)
    return model


# ---------------------------------------------------------------------------
# Streaming the checkpoint in, one layer at a time
# ---------------------------------------------------------------------------

def _weight_map(cfg) -> dict[str, str]:
    from glmkit.hub.verify import shard_map

    by_shard, problem = shard_map(cfg.paths.model_dir)
    if problem:
        raise ModelLoadError(f"{problem[0]}: {problem[1]}; {_verify_hint(cfg)}")
    if list(by_shard.values()) == [[]]:  # an unsharded checkpoint: its header lists the tensors
        from safetensors import safe_open

        (single,) = by_shard
        with _reading(cfg, single):
            with safe_open(os.path.join(cfg.paths.model_dir, single), framework="pt") as fh:
                return {key: single for key in fh.keys()}
    return {tensor: shard for shard, tensors in by_shard.items() for tensor in tensors}


@contextmanager
def _reading(cfg, filename: str):
    """Turn a shard that can't be read (damaged, truncated, lacking a tensor) into one line naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelLoadError(f"{os.path.join(cfg.paths.model_dir, filename)}: cannot be read ({detail}); "
                             f"{_verify_hint(cfg)}") from None


def _group_by_layer(weight_map: dict[str, str]) -> list[list[str]]:
    """Keys grouped so that one group is one decoder layer (non-layer tensors first)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for key in weight_map:
        match = LAYER_KEY.match(key)
        groups[-1 if match is None else int(match.group(1))].append(key)
    return [sorted(groups[layer]) for layer in sorted(groups)]


def _layer_of(key: str) -> int:
    """The layer index of a checkpoint key (MTP layers past the decoder layers); -1 outside the layers."""
    match = LAYER_KEY.match(key)
    return -1 if match is None else int(match.group(1))


def _read_tensors(cfg, weight_map: dict[str, str], keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        by_file[weight_map[key]].append(key)
    tensors = {}
    for filename, file_keys in by_file.items():
        with _reading(cfg, filename), safe_open(os.path.join(cfg.paths.model_dir, filename), framework="pt") as fh:
            for key in file_keys:
                tensors[key] = fh.get_tensor(key)
    return tensors


def _fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down weights (the Hub layout) -> transformers 5's fused 3-D params."""
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    fused = {}
    for key, tensor in tensors.items():
        match = _EXPERT_KEY.match(key)
        if match is None:
            fused[key] = tensor
        else:
            prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
            per_expert[prefix][expert][proj] = tensor
    for prefix, experts in per_expert.items():
        order = sorted(experts)
        # gate first, then up: the expert forward does `linear(x, gate_up_proj[e]).chunk(2)`.
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], dim=0) for e in order])
        fused[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
        experts.clear()
    return fused


def _place(model, key: str, tensor: torch.Tensor, device, cfg, compute_dtype) -> None:
    import bitsandbytes as bnb
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    qcfg = cfg.quantization
    # The routing correction bias decides which experts fire; transformers keeps it fp32.
    dtype = torch.float32 if attr == "e_score_correction_bias" else compute_dtype
    source, tensor = tensor, tensor.to(device=device, dtype=dtype)
    if tensor.data_ptr() == source.data_ptr():
        # Still a view of the memory-mapped shard (CPU, same dtype): own the memory, so the file can close.
        tensor = tensor.clone()
    if attr == "e_score_correction_bias":
        module.e_score_correction_bias = tensor
        return
    if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
        module.weight = bnb.nn.Params4bit(tensor, requires_grad=False, compress_statistics=qcfg.double_quant,
                                          quant_type=qcfg.quant_type, blocksize=qcfg.blocksize,
                                          module=module).to(device)
        return
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    if qcfg.quantize_experts and attr in ("gate_up_proj", "down_proj") and tensor.dim() == 3:
        replace_parameter_4bit(module, attr, compress_statistics=qcfg.double_quant,
                               quant_type=qcfg.quant_type, blocksize=qcfg.blocksize)


def load_model(cfg, device=None, shard=None):
    """Build the skeleton, stream every tensor in (quantizing as it lands), return the model.

    With `shard` (a glmkit.model.sharded_load.ShardedLoad), each packed 4-bit tensor is cut to this
    process's FSDP2 rows as soon as it is quantized, and `shard` records what was cut."""
    device = torch.device(device or "cpu")
    compute_dtype = DTYPES[cfg.quantization.compute_dtype]
    model_dir = cfg.paths.model_dir
    config = load_model_config(model_dir)
    model = build_skeleton(config, cfg)
    weight_map = _weight_map(cfg)
    for keys in _group_by_layer(weight_map):
        layer = _layer_of(keys[0])
        tensors = _fuse_experts(_read_tensors(cfg, weight_map, keys))
        for hub_key in list(tensors):
            key = mtp.kit_name(hub_key, config.num_hidden_layers)  # the MTP layer's keys as MtpModel names them
            if key is None or not _belongs_to(model, key):
                del tensors[hub_key]  # the MTP layer's copies of the embedding and lm_head: the trunk's are used
                continue
            _place(model, key, tensors.pop(hub_key), device, cfg, compute_dtype)
            if shard is not None:
                shard.keep_local_rows(model, key, layer)
        del tensors
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"the checkpoint in {model_dir} lacks {len(missing)} tensors "
                             f"(first: {missing[0]}); rerun `python download_model.py --verify-only`")
    model.to(device)  # non-persistent buffers (rotary tables) were built on the CPU
    model.config.use_cache = False
    return model


def _belongs_to(model, key: str) -> bool:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return hasattr(module, attr)


# ---------------------------------------------------------------------------
# LoRA and training mode
# ---------------------------------------------------------------------------

def prepare_for_training(model, cfg):
    """Freeze the base, turn on checkpointing, wrap with LoRA (the MTP layer's too with mtp.train). Nothing large is
    upcast."""
    from glmkit.model.lora import apply_lora

    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.memory.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs and with bitsandbytes' parametrization hooks.
        # offload: the layer inputs it keeps go to pinned host memory (transformers' save_on_cpu), CUDA only.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              offload=cfg.memory.offload_activations)
        model.enable_input_require_grads()
    model.config.use_cache = False
    return apply_lora(model, cfg.lora, train_mtp=cfg.mtp.train)


# ---------------------------------------------------------------------------
# Audit: what is in memory, per group, and is everything large really 4-bit?
# ---------------------------------------------------------------------------

def group_of(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if mtp.is_mtp_name(name):
        return "mtp"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp." in name:
        return "dense_mlp"
    if ".self_attn." in name and "norm" not in name:
        return "attention"
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    return "norms"


def quant_state_bytes(quant_state) -> int:
    """Bytes bitsandbytes keeps beside the packed 4-bit data: absmax, code, nested state."""
    total = 0
    for tensor in (quant_state.absmax, quant_state.code, getattr(quant_state, "offset", None)):
        if isinstance(tensor, torch.Tensor):
            total += tensor.numel() * tensor.element_size()
    if getattr(quant_state, "nested", False) and quant_state.state2 is not None:
        total += quant_state_bytes(quant_state.state2)
    return total


def packed_4bit_bytes(quant_state) -> int:
    """Bytes of a whole tensor's packed 4-bit data (two values a byte), from its logical shape: the audit
    reports whole tensors even where a process loaded for FSDP holds only its rows of them."""
    return (math.prod(quant_state.shape) + 1) // 2


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _param_entries(model):
    """(name, logical params, bytes, quantized?) for every parameter and persistent buffer."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization
    from torch.nn.utils.parametrize import ParametrizationList

    for module_name, module in model.named_modules():
        if isinstance(module, ParametrizationList):
            continue  # its `original` is reported below, under the parameter it stands for
        parametrized = getattr(module, "parametrizations", None)
        for attr, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}"
            if isinstance(param, bnb.nn.Params4bit) and param.quant_state is not None:
                qs = param.quant_state
                yield name, math.prod(qs.shape), packed_4bit_bytes(qs) + quant_state_bytes(qs), True
            else:
                yield name, param.numel(), tensor_bytes(param), False
        if parametrized is not None:
            for attr, plist in parametrized.items():
                qstates = [p.quant_state for p in plist if isinstance(p, Bnb4bitParametrization)]
                original = plist.original
                name = f"{module_name}.{attr}"
                if qstates:
                    qs = qstates[0]
                    yield name, math.prod(qs.shape), packed_4bit_bytes(qs) + quant_state_bytes(qs), True
                else:
                    yield name, original.numel(), tensor_bytes(original), False
        for attr, buf in module.named_buffers(recurse=False):
            if attr == "e_score_correction_bias":
                yield f"{module_name}.{attr}", buf.numel(), tensor_bytes(buf), False


def audit_model(model) -> dict:
    """Parameters and bytes per group, plus the counts that must be zero for a QLoRA run."""
    groups = {g: {"params": 0, "bytes": 0, "quantized_params": 0} for g in AUDIT_GROUPS}
    unquantized_experts = unquantized_linear = 0
    linear_weights = {f"{name}.weight" for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and "lora_" not in name and not name.endswith("lm_head")}
    for name, params, nbytes, quantized in _param_entries(model):
        name = name.replace(".parametrizations.", ".")
        group = groups[group_of(name)]
        group["params"] += params
        group["bytes"] += nbytes
        group["quantized_params"] += params if quantized else 0
        if is_routed_expert(name) and not quantized:  # the MTP layer's experts too
            unquantized_experts += params
        if name in linear_weights and not quantized:
            unquantized_linear += params
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "groups": groups,
        "params_total": sum(g["params"] for g in groups.values()),
        "bytes_total": sum(g["bytes"] for g in groups.values()),
        "unquantized_expert_params": unquantized_experts,
        "unquantized_linear_params": unquantized_linear,
        "trainable_params": trainable,
        # by the group of the layer each LoRA weight adapts: attention, routed_experts, shared_experts, ...
        "trainable_params_by_group": trainable_by_group(model),
    }


def is_routed_expert(name: str) -> bool:
    """A fused routed-expert parameter (a decoder layer's or the MTP layer's)."""
    return ".mlp.experts." in name and "lora_" not in name


def trainable_by_group(model) -> dict[str, int]:
    """Trainable (LoRA) parameters by the group of the layer they adapt; the three LoRA can target always listed,
    and `mtp` when the MTP layer is trained (all its LoRA: attention, experts, eh_proj)."""
    counts = {"attention": 0, "routed_experts": 0, "shared_experts": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # "...mlp.experts.base_layer.lora_A.default.weight" adapts "...mlp.experts."
            group = group_of(name.split(".lora_")[0] + ".")
            counts[group] = counts.get(group, 0) + param.numel()
    return counts


def check_audit(audit: dict, cfg) -> None:
    """Abort before training if anything that should be 4-bit is not."""
    problems = []
    if cfg.quantization.quantize_experts and audit["unquantized_expert_params"]:
        problems.append(f"{audit['unquantized_expert_params']:,} routed-expert parameters are not 4-bit")
    if cfg.quantization.load_in_4bit and audit["unquantized_linear_params"]:
        problems.append(f"{audit['unquantized_linear_params']:,} linear-layer parameters are not 4-bit")
    if problems:
        raise ModelLoadError("quantization audit failed: " + "; ".join(problems)
                             + " (the checkpoint layout is not what the loader expects)")


def format_audit(audit: dict) -> str:
    lines = [f"{'group':<16}{'params':>16}{'4-bit params':>16}{'GiB':>10}"]
    for name, g in audit["groups"].items():
        if g["params"]:
            lines.append(f"{name:<16}{g['params']:>16,}{g['quantized_params']:>16,}{g['bytes'] / 2**30:>10.3f}")
    lines.append(f"{'total':<16}{audit['params_total']:>16,}{'':>16}{audit['bytes_total'] / 2**30:>10.3f}")
    by_group = ", ".join(f"{name.replace('_', ' ')} {count:,}"
                         for name, count in audit.get("trainable_params_by_group", {}).items())
    lines.append(f"trainable (LoRA) params: {audit['trainable_params']:,} ({by_group}); "
                 f"unquantized experts: {audit['unquantized_expert_params']:,}; "
                 f"unquantized linears: {audit['unquantized_linear_params']:,}")
    return "\n".join(lines)
