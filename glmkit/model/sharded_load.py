"""Loading straight into FSDP2 shards: no process holds more than its shard plus about one layer.

Under `fsdp` every process builds the model, but GLM-4.6's 4-bit weights (~184 GB) fit on no
single GPU, and N processes each holding all of it would need N x 184 GB of host RAM. So the
loader streams the checkpoint one layer at a time, as always, quantizes each tensor whole (the
NF4 blocks and their statistics must be computed over the full tensor), then keeps only this
process's piece of the packed bytes: the rows FSDP2 will give it, `torch.chunk(packed, world)[rank]`
on dim 0. The full packed tensor is freed before the next one is quantized.

The pieces stand in for their tensors until the layer is sharded (glmkit/train/fsdp.py): there each
layer in turn gets full-size packed tensors back with only this rank's rows filled (from the kept
piece, which is then dropped), and `fully_shard` keeps exactly those rows. So the peak is this
rank's share of the model plus one layer's packed bytes, counted from the tensors as they are
allocated and freed (`peak_4bit_bytes`, `largest_layer_4bit_bytes`).

What is not chunked: the quantization statistics (replicated under FSDP2 anyway), the
non-4-bit tensors (norms, the router, embeddings and lm_head, sharded by `fully_shard` itself
from their full copy, one unit at a time), and the LoRA weights.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from glmkit.model.load import LAYER_KEY, tensor_bytes


def local_rows(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of `tensor` under FSDP2's dim-0 sharding: torch.chunk's pieces, empty past the last one."""
    pieces = torch.chunk(tensor, world, dim=0)
    return pieces[rank] if rank < len(pieces) else tensor[:0]


def packed_tensor_of(model, key: str):
    """(owner module, attribute, quant_state) of the packed 4-bit tensor that checkpoint `key` became, or None.

    A quantized Linear keeps it as `weight` (bitsandbytes' Params4bit); a fused routed-expert tensor as the
    `original` of its parametrization."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
        state = module.weight.quant_state
        return (module, "weight", state) if state is not None else None
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and attr in parametrizations:
        plist = parametrizations[attr]
        states = [p.quant_state for p in plist if isinstance(p, Bnb4bitParametrization)]
        if states:
            return plist, "original", states[0]
    return None


@dataclass
class _Piece:
    owner: torch.nn.Module  # the module holding the packed tensor as `attr`
    attr: str
    full_shape: tuple[int, ...]  # of the packed tensor before it was cut to this rank's rows
    quant_state: object


@dataclass
class ShardedLoad:
    """One process's part of a model loaded for FSDP2, and what loading it held at most, measured."""

    rank: int
    world: int
    pieces: list[_Piece] = field(default_factory=list)
    peak_4bit_bytes: int = 0  # the most packed 4-bit bytes this process held at once, loading and sharding
    largest_layer_4bit_bytes: int = 0  # one decoder layer's packed 4-bit bytes, whole
    _held: int = 0  # packed bytes held now (pieces, and the shards of layers already sharded)
    _layer_bytes: dict[int, int] = field(default_factory=dict)

    def keep_local_rows(self, model, key: str, layer: int | None = None) -> None:
        """Called as soon as `key` has been placed (and quantized): cut its packed tensor to this rank's rows.
        `layer`: the checkpoint layer it came from (the MTP layer's keys name it only in the checkpoint)."""
        found = packed_tensor_of(model, key)
        if found is None:
            return
        owner, attr, state = found
        param = getattr(owner, attr)
        full = tensor_bytes(param)
        self.peak_4bit_bytes = max(self.peak_4bit_bytes, self._held + full)
        full_shape = tuple(param.shape)
        # clone: a view would keep the whole tensor alive
        param.data = local_rows(param.data, self.rank, self.world).clone()
        self._held += tensor_bytes(param)
        if layer is None:
            match = LAYER_KEY.match(key)
            layer = int(match.group(1)) if match else -1
        self._layer_bytes[layer] = self._layer_bytes.get(layer, 0) + full
        if layer >= 0:
            self.largest_layer_4bit_bytes = max(self.largest_layer_4bit_bytes, self._layer_bytes[layer])
        self.pieces.append(_Piece(owner, attr, full_shape, state))

    @contextmanager
    def shape_stand_ins(self):
        """While peft wraps the model: a cut routed-expert tensor reads as a memory-free tensor of its full shape.

        peft's ParamWrapper reads the parametrized tensor, which dequantizes it, only to learn its shape, dtype
        and device; dequantizing this rank's rows against the whole tensor's statistics would fail."""
        from bitsandbytes.nn.parametrize import Bnb4bitParametrization

        patched = []
        for piece in self.pieces:
            if piece.attr != "original":
                continue
            stand_in = torch.empty((), dtype=piece.quant_state.dtype,
                                   device=getattr(piece.owner, piece.attr).device).expand(piece.quant_state.shape)
            for parametrization in piece.owner:
                if isinstance(parametrization, Bnb4bitParametrization):
                    parametrization.forward = lambda _packed, _t=stand_in: _t
                    patched.append(parametrization)
        try:
            yield
        finally:
            for parametrization in patched:
                del parametrization.forward  # back to the class's dequantizing forward

    def restore_full_size(self, layer: torch.nn.Module, device) -> list[_Piece]:
        """Give `layer`'s cut tensors full-size storage holding this rank's rows, for fully_shard to cut again.

        Called for one layer at a time, right before fully_shard(layer). Only this rank's rows are filled (the
        others are never read: fully_shard keeps exactly these rows), and each kept piece is dropped as soon as
        it is copied, so while fully_shard builds its shards the layer is held once, whole."""
        owned = {id(module) for module in layer.modules()}
        restored = []
        for piece in self.pieces:
            if id(piece.owner) in owned:
                param = getattr(piece.owner, piece.attr)
                kept = param.data
                full = torch.empty(piece.full_shape, dtype=kept.dtype, device=device)
                local_rows(full, self.rank, self.world).copy_(kept)
                self.peak_4bit_bytes = max(self.peak_4bit_bytes, self._held + tensor_bytes(full))
                param.data = full
                self._held += tensor_bytes(full) - tensor_bytes(kept)
                del kept
                restored.append(piece)
        return restored

    def check_shards(self, restored: list[_Piece]) -> None:
        """After fully_shard: each local shard has the rows the loader kept (a changed sharding rule fails here)."""
        for piece in restored:
            local = getattr(piece.owner, piece.attr).to_local()
            kept_shape = local_rows(torch.empty(piece.full_shape, device="meta"), self.rank, self.world).shape
            if local.shape != kept_shape:
                raise RuntimeError(f"FSDP2 gave rank {self.rank} {tuple(local.shape)} of a packed tensor, the loader "
                                   f"kept {tuple(kept_shape)}: the dim-0 sharding rule changed")
            self._held += tensor_bytes(local) - math.prod(piece.full_shape) * local.element_size()
        restored_ids = {id(piece) for piece in restored}
        self.pieces = [piece for piece in self.pieces if id(piece) not in restored_ids]

    def report(self) -> dict:
        return {"load_peak_4bit_bytes": self.peak_4bit_bytes,
                "largest_layer_4bit_bytes": self.largest_layer_4bit_bytes}
