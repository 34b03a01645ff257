"""The multi-token-prediction (MTP) layer: loaded beside the trunk, run on its hidden states, named two ways.

GLM-4.5-Air ships one MTP layer after its 46 decoder layers. At serving time vLLM and SGLang use it to
draft the token after next: from the trunk's last hidden state at position j and the embedding of
token j+1 it predicts token j+2, and the trunk then checks the draft. Continued pre-training moves the
trunk's hidden states; an MTP layer left as it was drafts worse, and serving slows. So the kit loads
it (4-bit, like a decoder layer), measures how often its drafts would be accepted at every eval, and
can train it alongside (glmkit/train/mtp.py).

The layer is transformers' own: `MtpModel(model, n).layers`, the `MtpLayer`s transformers builds for
`generate(use_mtp=True)` (enorm, hnorm, eh_proj, the decoder block `mtp_block`, and `post_norm`, the
Hub's `shared_head.norm`). The kit hangs them on the causal LM as `layers`, where MtpModel keeps them,
so a LoRA weight on the MTP layer has MtpModel's own name (`layers.0.mtp_block.self_attn.q_proj`): plain
peft loads the one adapter, trunk and MTP LoRA together, onto a transformers model given MtpModel's layers
the same way (`model.layers = MtpModel.from_pretrained(model).layers`; tests/test_mtp.py). Not onto a
bare MtpModel: transformers' key mapping for MtpModel renames the trunk's `model.layers.0.*` keys into the
MTP layer's. The checkpoint stores the same tensors the Hub's way,
`model.layers.<num_hidden_layers>.*`, per expert; `kit_name` and `hub_name` translate. The Hub's
GLM-4.5(-Air) checkpoints also keep copies of the trunk's embedding and lm_head in the MTP layer
(`embed_tokens`, `shared_head.head`); like transformers, the kit uses the trunk's and does not load them.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from glmkit.hub.mtp_layout import announced_mtp_layers, mtp_problem
from glmkit.model.errors import ModelLoadError

# Where the kit keeps the MTP layers on the causal LM: MtpModel's attribute, so the names are MtpModel's.
MTP_ATTRIBUTE = "layers"
# Parts of an MtpLayer outside its decoder block; the Hub stores them beside the block's tensors.
_OWN_PARTS = ("enorm", "hnorm", "eh_proj")
_HUB_NORM, _KIT_NORM = "shared_head.norm.", "post_norm."
# The Hub's copies of the trunk's tensors in the MTP layer: the trunk's own are used (transformers does the same).
SHARED_WITH_TRUNK = ("embed_tokens.", "shared_head.head.")
_HUB_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_KIT_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
# Any name inside an MTP layer, through wrappers (`base_model.model.`, `module.`): never a trunk name,
# which reads `model.layers.N.` followed by a decoder layer's parts.
_IN_MTP = re.compile(r"(?:^|\.)layers\.\d+\.(?:mtp_block|enorm|hnorm|eh_proj|post_norm)(?:\.|$)")
# The keyword arguments the kit's varlen attention reads (glmkit/model/attention.py), passed to the MTP block too.
_ATTENTION_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# ---------------------------------------------------------------------------
# Names: the Hub's checkpoint keys and the kit's module names
# ---------------------------------------------------------------------------

def num_mtp_layers(config) -> int:
    return int(getattr(config, "num_nextn_predict_layers", 0) or 0)


def is_mtp_name(name: str) -> bool:
    """A parameter or module name inside an MTP layer (any wrapper prefix)."""
    return _IN_MTP.search(name) is not None


def kit_name(hub_key: str, num_hidden_layers: int) -> str | None:
    """A checkpoint key as the kit's model names it: trunk keys unchanged, MTP keys under `layers.K.`;
    None for the MTP layer's copies of the trunk's embedding and lm_head."""
    match = _HUB_KEY.match(hub_key)
    if match is None or int(match.group(1)) < num_hidden_layers:
        return hub_key
    k, rest = int(match.group(1)) - num_hidden_layers, match.group(2)
    if rest.startswith(SHARED_WITH_TRUNK):
        return None
    if rest.startswith(_HUB_NORM):
        return f"{MTP_ATTRIBUTE}.{k}.{_KIT_NORM}{rest[len(_HUB_NORM):]}"
    if rest.split(".", 1)[0] in _OWN_PARTS:
        return f"{MTP_ATTRIBUTE}.{k}.{rest}"
    return f"{MTP_ATTRIBUTE}.{k}.mtp_block.{rest}"


def hub_name(name: str, num_hidden_layers: int) -> str:
    """The inverse of kit_name: a kit name (parameter or module) as the Hub's checkpoint spells it."""
    match = _KIT_KEY.match(name)
    if match is None or not is_mtp_name(name):
        return name
    layer, rest = num_hidden_layers + int(match.group(1)), match.group(2)
    if rest.startswith("mtp_block."):
        rest = rest[len("mtp_block."):]
    elif rest.startswith(_KIT_NORM):
        rest = _HUB_NORM + rest[len(_KIT_NORM):]
    return f"model.layers.{layer}.{rest}"


# ---------------------------------------------------------------------------
# Building: transformers' MtpLayers on the causal LM
# ---------------------------------------------------------------------------

def check_checkpoint(config_dict: dict, tensor_names, where: str) -> None:
    """One line (ModelLoadError) when config.json and the weights disagree about the MTP layer."""
    problem = mtp_problem(config_dict, tensor_names)
    if problem:
        raise ModelLoadError(f"{where}/config.json {problem}")
    if (count := announced_mtp_layers(config_dict)) > 1:
        raise ModelLoadError(f"{where}/config.json announces {count} MTP layers; the kit measures and trains one "
                             f"(GLM's); set num_nextn_predict_layers to 1 or 0")


def build_mtp_layers(model) -> nn.ModuleList | None:
    """The MTP layers a causal LM's config announces, built by transformers' MtpModel (None: it announces none).

    Built where the call runs (meta device, init_empty_weights, or real storage with the global RNG's
    initialisation). Floating parameters take the trunk's dtype; the router's correction bias stays fp32,
    as in the trunk."""
    count = num_mtp_layers(model.config)
    if not count:
        return None
    from transformers.modeling_layers import MtpModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # MtpModel's post_init chatter about shared weights
    try:
        with _mtp_config_keys(model.config, count):
            layers = MtpModel(model, count).layers
    finally:
        hf_logging.set_verbosity(verbosity)
    dtype = model.get_input_embeddings().weight.dtype
    for module in layers.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                module._parameters[name] = nn.Parameter(param.data.to(dtype), requires_grad=param.requires_grad)
    return layers


@contextmanager
def _mtp_config_keys(config, count: int):
    """The keys MtpModel reads, on the config while it builds, when the config class lacks them.

    Glm4MoeConfig has `num_mtp_layers`; Glm4MoeLiteConfig (GLM-4.7-Flash) has neither it nor the
    `mtp_mlp_layer_types` MtpModel wants beside `mlp_layer_types`, though its checkpoint's MTP layer is the
    same kind of layer (a MoE decoder block, `model.layers.47.*`). They are set for the build only and
    removed after, so config.json and everything else that reads the config are as before."""
    added = {}
    if getattr(config, "num_mtp_layers", None) is None:
        added["num_mtp_layers"] = count
    if getattr(config, "mlp_layer_types", None) is not None and getattr(config, "mtp_mlp_layer_types", None) is None:
        added["mtp_mlp_layer_types"] = ["sparse"] * count  # GLM's MTP layers are MoE layers
    for key, value in added.items():
        setattr(config, key, value)
    try:
        yield
    finally:
        for key in added:
            delattr(config, key)


def attach_mtp_layers(model) -> nn.ModuleList | None:
    """build_mtp_layers, hung on the causal LM as `model.layers` (MtpModel's names); None when there are none."""
    layers = build_mtp_layers(model)
    if layers is not None:
        setattr(model, MTP_ATTRIBUTE, layers)
    return layers


def hub_tensors(layers: nn.ModuleList, num_hidden_layers: int) -> dict[str, torch.Tensor]:
    """The MTP layers' tensors as the Hub stores them: `model.layers.N.*`, routed experts per expert."""
    tensors = {}
    for name, tensor in layers.state_dict().items():
        key = hub_name(f"{MTP_ATTRIBUTE}.{name}", num_hidden_layers)
        prefix, _, attr = key.rpartition(".")
        if attr == "gate_up_proj" and prefix.endswith(".mlp.experts"):
            half = tensor.shape[1] // 2  # [gate; up] rows, the order the loader fuses them back in
            for e in range(tensor.shape[0]):
                tensors[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :half].clone()
                tensors[f"{prefix}.{e}.up_proj.weight"] = tensor[e, half:].clone()
        elif attr == "down_proj" and prefix.endswith(".mlp.experts"):
            for e in range(tensor.shape[0]):
                tensors[f"{prefix}.{e}.down_proj.weight"] = tensor[e].clone()
        else:
            tensors[key] = tensor.clone()
    return tensors


@contextmanager
def set_aside(model):
    """The MTP layers taken off the causal LM for the duration (peft wraps what it sees), then put back."""
    layers = model._modules.pop(MTP_ATTRIBUTE, None)
    try:
        yield
    finally:
        if layers is not None:
            setattr(model, MTP_ATTRIBUTE, layers)


def causal_lm_of(model) -> nn.Module:
    """The causal LM inside DDP / Accelerate / FSDP and peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def mtp_layers(model) -> list[nn.Module]:
    """The MTP layers of a (wrapped) causal LM; [] when it has none."""
    layers = getattr(causal_lm_of(model), MTP_ATTRIBUTE, None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def has_mtp(model) -> bool:
    return bool(mtp_layers(model))


# ---------------------------------------------------------------------------
# Running: the MTP layer inside the model's forward, on the trunk's final hidden states
# ---------------------------------------------------------------------------

@dataclass
class MtpOutput:
    hidden: torch.Tensor | None = None  # [B, L, H] after the MTP layer's own norm: lm_head's input for token j+2


@contextmanager
def mtp_forward(model, grad_to_trunk: bool = False):
    """While active, the model's forward also runs its (first) MTP layer; the result lands in the yielded MtpOutput.

    It runs inside the forward of the outermost module (a hook on the decoder stack), so DDP and FSDP see
    its parameters used in the forward they wrap, as for any layer. Position j gets the trunk's final hidden
    state at j (detached unless `grad_to_trunk`) and the embedding of token j+1; the block attends within
    the same documents and positions as the trunk (vLLM's convention; rotary attention only sees offsets, so
    transformers' one-ahead positions give the same scores). Position j's output predicts token j+2."""
    causal_lm = causal_lm_of(model)
    layer = mtp_layers(causal_lm)[0]
    out = MtpOutput()

    def run(module, _args, kwargs, output):
        out.hidden = _mtp_hidden(causal_lm, layer, output.last_hidden_state, kwargs, grad_to_trunk)

    handle = causal_lm.get_decoder().register_forward_hook(run, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()


def _mtp_hidden(causal_lm, layer, trunk_hidden: torch.Tensor, inputs: dict, grad_to_trunk: bool) -> torch.Tensor:
    from transformers.masking_utils import create_causal_mask

    decoder = causal_lm.get_decoder()
    input_ids = inputs["input_ids"]
    # The token after each position (the last position repeats its own: it has no target two ahead).
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
    embeds = decoder.embed_tokens(next_ids)
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
    mask = create_causal_mask(config=decoder.config, inputs_embeds=embeds, attention_mask=inputs.get("attention_mask"),
                              past_key_values=None, position_ids=position_ids)
    hidden = trunk_hidden if grad_to_trunk else trunk_hidden.detach()
    attention = {key: inputs[key] for key in _ATTENTION_KWARGS if key in inputs}
    return layer(embeds, hidden, position_embeddings=decoder.rotary_emb(embeds, position_ids), attention_mask=mask,
                 position_ids=position_ids, past_key_values=None, **attention)
