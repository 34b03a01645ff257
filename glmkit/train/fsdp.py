"""FSDP2 for the 4-bit model: every decoder layer (and the MTP layer) its own `fully_shard` unit, the frozen NF4 data
sharded.

torch's `fully_shard` (FSDP2) turns each parameter of a unit into a DTensor sharded on dim 0
and all-gathers a unit's parameters, of any dtypes, into one flat byte buffer just before its
forward (and again for backward), freeing them after. That is exactly what the kit's 4-bit
base needs, with no float-storage trick: the packed NF4 bytes are uint8 parameters
(bitsandbytes' `Params4bit` for the Linear layers, the `original` of
`replace_parameter_4bit`'s parametrization for the fused routed experts), so they shard like
any other parameter, and the LoRA weights in the same unit come along with their gradients
(reduce-scattered) and AdamW moments (allocated per shard by the optimizer).

What FSDP2 does not see stays replicated: the quantization statistics (absmax and its nested
state, 1/64th of the weights' elements, a few per cent of the 4-bit bytes with double quant),
which live beside the parameter, not in it, and the buffers (rotary tables, the router's
correction bias).

Two details make the 4-bit layers run on gathered parameters:
- a gathered Linear4bit weight is a plain Parameter, no longer a `Params4bit` with its
  `quant_state`; bitsandbytes recovers it from the module (`Linear4bit.quant_state`, set
  when the weight was quantized) at every forward (fix_4bit_weight_quant_state_from_module);
- the kit's loss takes lm_head's weight after the model's forward (glmkit/train/loss.py). The
  root unit (embeddings, final norm, lm_head) is FSDP2's root, which it keeps gathered from
  forward through backward, so the weight is whole when the loss reads it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

STRATEGY = "fsdp"


def decoder_layers(model) -> list[nn.Module]:
    """The decoder layers of a (peft-wrapped) causal LM, then its MTP layers: the units FSDP gathers one at a time."""
    from glmkit.model.mtp import mtp_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers) + mtp_layers(base)


def _keep_quant_state_on_module(model) -> None:
    """Every Linear4bit must carry its quant_state itself: FSDP2's gathered weight does not."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = getattr(module.weight, "quant_state", None)
            if state is not None:
                module.quant_state = state


def _quant_states(model):
    seen = set()
    for module in model.modules():
        for state in [getattr(module, "quant_state", None)] + [getattr(p, "quant_state", None)
                                                               for p in module._parameters.values()]:
            if state is not None and id(state) not in seen:
                seen.add(id(state))
                yield state


def shard_model(model, device, loaded=None) -> nn.Module:
    """fully_shard each decoder layer, then the root. Call after LoRA is applied, before the optimizer.

    With `loaded` (the ShardedLoad the model was loaded with: its packed 4-bit tensors cut to this rank's
    rows), each layer in turn gets its full-size tensors back with this rank's rows filled, and
    fully_shard keeps those rows: one layer at a time is ever whole.
    fully_shard moves parameters and buffers onto the mesh's device; the 4-bit statistics are neither,
    so they are moved here."""
    from torch.distributed.fsdp import fully_shard

    _keep_quant_state_on_module(model)
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for unit in decoder_layers(model) + [model]:  # the root last: what no layer owns
        restored = loaded.restore_full_size(unit, device) if loaded is not None else []
        fully_shard(unit, mesh=mesh)
        if loaded is not None:
            loaded.check_shards(restored)
    for state in _quant_states(model):
        state.to(device)  # in place (bitsandbytes QuantState.to)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def resident_bytes(model) -> dict:
    """What this process holds of the base model, measured from the tensors: 4-bit data (local shards
    under FSDP), the quantization statistics beside it, the other frozen tensors, and LoRA."""
    from torch.distributed.tensor import DTensor

    from glmkit.model.load import quant_state_bytes

    def local(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    packed = other = lora = 0
    for param in model.parameters():
        if param.requires_grad:
            lora += local(param)
        elif param.dtype == torch.uint8:
            packed += local(param)
        else:
            other += local(param)
    stats = sum(quant_state_bytes(state) for state in _quant_states(model))
    return {"packed_4bit_bytes": packed, "quant_state_bytes": stats, "other_frozen_bytes": other, "lora_bytes": lora}


def resident_bytes_by_rank(model, accelerator, loaded=None) -> list[dict]:
    """resident_bytes of every process (one gather), in rank order; with `loaded` (a ShardedLoad), also the most
    packed 4-bit bytes the process held while loading and sharding, and one layer's."""
    mine = resident_bytes(model) | (loaded.report() if loaded is not None else {})
    keys = list(mine)
    gathered = accelerator.gather(torch.tensor([[mine[k] for k in keys]], dtype=torch.int64,
                                               device=accelerator.device))
    return [dict(zip(keys, map(int, row))) for row in gathered.tolist()]


# ---------------------------------------------------------------------------
# Checkpoints: the same PEFT adapter a DDP run writes, plus the optimizer saved sharded
# ---------------------------------------------------------------------------

OPTIMIZER_DIR = "optimizer_sharded"  # torch.distributed.checkpoint: one file per rank plus .metadata


def _adapter_key(param_name: str, adapter: str) -> str:
    """The key peft writes for a LoRA parameter: its name without the adapter segment."""
    return param_name.replace(f".{adapter}.", ".")


class ShardedState:
    """What a checkpoint holds of a run whose model is sharded (or trained with the fsdp strategy at all).

    The adapter is gathered whole (every rank takes part, the main process writes it with peft,
    so the file is the one a DDP run writes). The AdamW state is saved and loaded with
    torch.distributed.checkpoint, keyed by parameter name, each rank writing its own shards:
    DCP reshards on load, so a checkpoint resumes on another number of processes (a 1-process
    run holds plain tensors, which DCP fills from the sharded files and vice versa).
    """

    def __init__(self, model, optimizer, adapter: str = "default"):
        self.model, self.optimizer, self.adapter = model, optimizer, adapter

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """{model parameter name: full tensor on the CPU} of every LoRA weight; a collective under FSDP."""
        from torch.distributed.tensor import DTensor

        state = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                full = param.full_tensor() if isinstance(param, DTensor) else param
                state[name] = full.detach().to("cpu", copy=True)
        return state

    def save_optimizer(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizer)},
                 checkpoint_id=os.path.join(folder, OPTIMIZER_DIR))

    def load(self, folder: str) -> None:
        """The adapter from adapter_model.safetensors, then the optimizer state, resharded onto this run."""
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        names = [name for name, param in self.model.named_parameters() if param.requires_grad]
        missing = [name for name in names if _adapter_key(name, self.adapter) not in saved]
        if missing:
            raise KeyError(f"{folder}/adapter_model.safetensors lacks {len(missing)} LoRA weights (first: {missing[0]})")
        full = {name: saved[_adapter_key(name, self.adapter)] for name in names}
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        state = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load({"optimizer": state}, checkpoint_id=os.path.join(folder, OPTIMIZER_DIR))
        set_optimizer_state_dict(self.model, self.optimizer, state)
