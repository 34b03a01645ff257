"""What the model's tensors cost: the architecture, every tensor in the dtype it will be held, LoRA targets.

Part of the memory plan (glmkit/plan/fit.py): the model is built on the meta device from
`paths.model_dir`'s config.json, or from the published architecture model.name_or_path names
(GLM-4.5-Air's for a name the kit does not know), and every tensor is priced the way it will be held
(4-bit exactly as bitsandbytes stores it, the rest in its dtype).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from glmkit.model.load import BASE_GROUPS, DTYPES, group_of  # shared with the audit, so plan and audit compare

GB = 1e9
# QLoRA paper: NF4 with double quantization costs 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.
QLORA_BITS_PER_PARAM = 4.127
# The plain transformers path: BitsAndBytesConfig has no block size; bitsandbytes defaults to 64.
PLAIN_BLOCKSIZE = 64

# zai-org/GLM-4.5-Air's published config.json (the keys transformers' Glm4MoeConfig reads). Its MTP layer
# (num_nextn_predict_layers: 1) is loaded by the kit and planned like a decoder layer (glmkit/model/mtp.py).
GLM45_AIR_CONFIG = {
    "model_type": "glm4_moe",
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 46,
    "first_k_dense_replace": 1,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "n_routed_experts": 128,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "attention_bias": True,
    "use_qk_norm": False,
    "partial_rotary_factor": 0.5,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338],
    "num_nextn_predict_layers": 1,
}
GLM45_AIR_NAME = "zai-org/GLM-4.5-Air"

# zai-org/GLM-4.5 and zai-org/GLM-4.6 (355B, 32B active): the same class at a larger size, with QK-norm and the
# first three layers dense; GLM-4.6 differs from GLM-4.5 only in its context length. NF4: about 184 GB of weights,
# more than one GPU holds, so these train sharded (distributed.accelerate_config: fsdp).
GLM45_CONFIG = {
    **GLM45_AIR_CONFIG,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 92,
    "first_k_dense_replace": 3,
    "n_routed_experts": 160,
    "routed_scaling_factor": 2.5,
    "use_qk_norm": True,
}
GLM46_CONFIG = {**GLM45_CONFIG, "max_position_embeddings": 202752}
GLM47_CONFIG = GLM46_CONFIG  # zai-org/GLM-4.7 has GLM-4.6's architecture

# zai-org/GLM-4.7-Flash (about 30B, 3B active): transformers' glm4_moe_lite, GLM's MoE half (64 routed experts, top 4,
# a shared expert, the first layer dense) with multi-head latent attention (q through a 768-wide latent, k and v from
# one 512-wide latent plus a 64-wide shared rotary key; q/k head dim 192 + 64 = 256, v head dim 256; every head its own
# k and v). Its published config.json, the keys transformers' Glm4MoeLiteConfig reads (the same values are that class's
# defaults in transformers 5.23), and its MTP layer (model.layers.47, with copies of the embedding and lm_head).
GLM47_FLASH_NAME = "zai-org/GLM-4.7-Flash"
GLM47_FLASH_CONFIG = {
    "model_type": "glm4_moe_lite",
    "vocab_size": 154880,
    "hidden_size": 2048,
    "intermediate_size": 10240,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 47,
    "first_k_dense_replace": 1,
    "num_attention_heads": 20,
    "num_key_value_heads": 20,
    "q_lora_rank": 768,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "v_head_dim": 256,
    "n_routed_experts": 64,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.8,
    "attention_bias": False,
    "partial_rotary_factor": 1.0,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 202752,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "num_nextn_predict_layers": 1,
}
# model.name_or_path -> the architecture the plan uses before the checkpoint is downloaded
BUILTIN_ARCHITECTURES = {GLM45_AIR_NAME: GLM45_AIR_CONFIG, "zai-org/GLM-4.5": GLM45_CONFIG,
                         "zai-org/GLM-4.6": GLM46_CONFIG, "zai-org/GLM-4.7": GLM47_CONFIG,
                         GLM47_FLASH_NAME: GLM47_FLASH_CONFIG}


def builtin_name(name_or_path: str) -> str:
    """The built-in architecture planned for model.name_or_path (GLM-4.5-Air's for any other name)."""
    name = name_or_path.rstrip("/")
    return name if name in BUILTIN_ARCHITECTURES else GLM45_AIR_NAME


def builtin_config(name: str):
    """The transformers config of a built-in architecture (its model_type picks the class)."""
    from transformers import AutoConfig

    keys = dict(BUILTIN_ARCHITECTURES[name])
    return AutoConfig.for_model(keys.pop("model_type"), **keys)


class PlanError(RuntimeError):
    """The plan can't be made; the message (one line) says why and what to do."""


# ---------------------------------------------------------------------------
# Byte counts of one tensor
# ---------------------------------------------------------------------------

def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes bitsandbytes 0.50 holds for one 4-bit tensor of `numel` values (uint8 storage).

    Mirrors `functional.quantize_4bit`: packed data (n+1)//2 bytes, a fresh 16-entry fp32
    code, and per block an fp32 absmax, or with double quantization a uint8 absmax plus the
    nested state `quantize_blockwise(absmax - offset, blocksize=256)` leaves: fp32 absmax per
    256 blocks, its own copy of the 256-entry fp32 dynamic code, and the fp32 offset.
    """
    blocks = -(-numel // blocksize)
    total = (numel + 1) // 2 + 16 * 4
    if double_quant:
        total += blocks + (-(-blocks // 256)) * 4 + 256 * 4 + 4
    else:
        total += blocks * 4
    return total


def qlora_floor_bytes(numel: int) -> float:
    return numel * QLORA_BITS_PER_PARAM / 8


# ---------------------------------------------------------------------------
# Architecture: config.json when downloaded, else the built-in one model.name_or_path names
# ---------------------------------------------------------------------------

def load_architecture(cfg):
    """(transformers config, "config.json" | "builtin")."""
    model_dir = cfg.paths.model_dir
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(model_dir, local_files_only=True), "config.json"
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PlanError(f"{model_dir}/config.json can't be read by transformers: {first}") from None
    return builtin_config(builtin_name(cfg.model.name_or_path)), "builtin"


def build_meta_model(hf_config, compute_dtype: str):
    """The model with shapes and dtypes but no storage, its MTP layer included: enough to price every tensor."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from glmkit.model.mtp import attach_mtp_layers

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # from_config chatter is noise in a plan
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[compute_dtype])
            attach_mtp_layers(model)
            return model
    except (ValueError, KeyError) as exc:
        raise PlanError(f"transformers can't build a {getattr(hf_config, 'model_type', '?')!r} model: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------
# Tensors of the model, grouped like glmkit.model.load.audit_model
# ---------------------------------------------------------------------------

@dataclass
class TensorInfo:
    name: str
    group: str
    numel: int
    dtype_bytes: int
    layer: int | None       # decoder layer index (the MTP layer's as the checkpoint numbers it), None outside
    is_linear_weight: bool  # weight of an nn.Linear other than lm_head: 4-bit in both kit and plain path
    is_expert: bool         # a fused 3-D routed-expert parameter: 4-bit only in the kit


def _layer_index(name: str, num_hidden_layers: int) -> int | None:
    from glmkit.model.mtp import hub_name

    parts = hub_name(name, num_hidden_layers).split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def enumerate_tensors(model) -> list[TensorInfo]:
    """Every parameter, plus the persistent router buffer the audit counts."""
    layers = model.config.num_hidden_layers
    linear_weights = {f"{name}.weight" for name, module in model.named_modules()
                      if isinstance(module, nn.Linear) and not name.endswith("lm_head")}
    tensors = []
    for name, param in model.named_parameters():
        is_expert = ".mlp.experts." in name and param.dim() == 3
        tensors.append(TensorInfo(name, group_of(name), param.numel(), param.element_size(),
                                  _layer_index(name, layers), name in linear_weights, is_expert))
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            tensors.append(TensorInfo(name, group_of(name), buf.numel(), buf.element_size(),
                                      _layer_index(name, layers), False, False))
    return tensors


def kit_bytes(t: TensorInfo, q) -> int:
    """As glmkit.model.load.load_model holds it."""
    if q.load_in_4bit and (t.is_linear_weight or (t.is_expert and q.quantize_experts)):
        return nf4_bytes(t.numel, q.blocksize, q.double_quant)
    return t.numel * t.dtype_bytes


def replicated_bytes(t: TensorInfo, q) -> int:
    """What FSDP leaves whole on every GPU of this tensor: a 4-bit tensor's statistics (absmax, code, nested
    state) live beside the packed data, not in the parameter FSDP shards (glmkit/train/fsdp.py)."""
    if _kit_quantized(t, q):
        return kit_bytes(t, q) - (t.numel + 1) // 2
    return 0


def _kit_quantized(t: TensorInfo, q) -> bool:
    return q.load_in_4bit and (t.is_linear_weight or (t.is_expert and q.quantize_experts))


def _plain_bytes(t: TensorInfo, q, upcast: bool) -> int:
    """As from_pretrained(quantization_config=BitsAndBytesConfig(...)) holds it: only nn.Linear
    goes 4-bit, the fused experts stay in the load dtype; `prepare_model_for_kbit_training`
    then casts every non-4-bit parameter to fp32 (upcast=True)."""
    if t.is_linear_weight:
        return nf4_bytes(t.numel, PLAIN_BLOCKSIZE, q.double_quant)
    return t.numel * (4 if upcast else t.dtype_bytes)


def _floor_bytes(t: TensorInfo) -> float:
    """The QLoRA ideal: 4.127 bits for everything the kit can quantize, bf16 for the rest."""
    if t.is_linear_weight or t.is_expert:
        return qlora_floor_bytes(t.numel)
    return t.numel * 2.0


def price_groups(tensors: list[TensorInfo], q) -> dict:
    groups = {g: {"params": 0, "quantized_params": 0, "bytes": 0, "plain_path_bytes": 0,
                  "plain_path_upcast_bytes": 0, "qlora_floor_bytes": 0} for g in BASE_GROUPS}
    for t in tensors:
        g = groups.setdefault(t.group, {k: 0 for k in groups["attention"]})
        g["params"] += t.numel
        g["quantized_params"] += t.numel if _kit_quantized(t, q) else 0
        g["bytes"] += kit_bytes(t, q)
        plain = t.group != "mtp"  # transformers' from_pretrained does not load the MTP layer
        g["plain_path_bytes"] += _plain_bytes(t, q, upcast=False) if plain else 0
        g["plain_path_upcast_bytes"] += _plain_bytes(t, q, upcast=True) if plain else 0
        g["qlora_floor_bytes"] += _floor_bytes(t)
    for g in groups.values():
        g["qlora_floor_bytes"] = int(round(g["qlora_floor_bytes"]))
    return groups


# ---------------------------------------------------------------------------
# LoRA: which modules and parameters PEFT will wrap, and how many weights that adds
# ---------------------------------------------------------------------------

@dataclass
class LoraTarget:
    name: str
    layer: int | None
    in_features: int
    params: int
    expert: bool = False    # a fused 3-D routed-expert parameter (glmkit.model.expert_lora), at lora.expert_r


def lora_targets(model, lora, train_mtp: bool = False) -> list[LoraTarget]:
    """LoRA on a Linear adds r*(in+out); on a 3-D expert parameter [E, a, b], E*r*(a+b) at the expert rank.
    The MTP layer's modules count with `train_mtp` (mtp.train) only."""
    from glmkit.model.lora import expert_rank, matches, peft_module_names
    from glmkit.model.mtp import is_mtp_name

    modules = peft_module_names(model, lora.target_modules)  # `attention`: the model's own projections
    all_linear = "all-linear" in modules
    layers = model.config.num_hidden_layers
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (is_mtp_name(name) and not train_mtp):
            continue
        if (all_linear and not name.endswith("lm_head")) or matches(name, modules):
            found.append(LoraTarget(name, _layer_index(name, layers), module.in_features,
                                    lora.r * (module.in_features + module.out_features)))
    for name, param in model.named_parameters():
        if is_mtp_name(name) and not train_mtp:
            continue
        if lora.target_parameters and matches(name, lora.target_parameters):
            shape = tuple(param.shape)
            experts, a, b = shape if len(shape) == 3 else (1, *shape)
            found.append(LoraTarget(name, _layer_index(name, layers), b, experts * expert_rank(lora)[0] * (a + b),
                                    expert=True))
    return found
