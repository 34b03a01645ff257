"""LoRA on the fused routed experts while they stay 4-bit.

transformers 5 holds a layer's routed experts as two fused 3-D parameters, gate_up_proj
[E, 2I, H] and down_proj [E, H, I]; the kit keeps them NF4 behind bitsandbytes'
parametrization. peft can adapt such parameters (`target_parameters`, its ParamWrapper), but
as it stands: (1) it finds a parametrized tensor only by its full name, (2) it nests a layer's
two wrappers in the opposite order from a plain model's, so the adapter would not load back
into one, and (3) its forward adds the low-rank delta to the whole weight, a second
[E, 2I, H] tensor per layer plus a weight-sized gradient in backward.

So peft owns the weights (names, shapes, init, saving, loading, merging on a plain model:
the adapter is a standard peft adapter), and the kit replaces only the computation:
`ExpertLora.forward` runs the grouped_mm expert path on the dequantized base weights and adds
LoRA in factored form per routed token, y += scale * B_e (A_e x). Nothing the size of an
expert tensor is created for LoRA, in forward or backward. glmkit.model.lora resolves the names,
this module does the rest.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import ParamWrapper


class ExpertLoraError(ValueError):
    """The experts module is not laid out the way the factored forward assumes."""


class ExpertLora(ParamWrapper):
    """peft's ParamWrapper (same weights and state-dict names) with a factored grouped_mm forward.

    A layer's two wrappers are nested; the outer one is what the MoE block calls, and it
    computes both projections. The inner one is never called.
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        chain, experts = wrapper_chain(self)
        if self.disable_adapters or any(w.merged for w in chain):
            return experts(hidden_states, *args, **kwargs)
        factors = {w.parameter_name: [lora_factors(w, name) for name in w.active_adapters if name in w.lora_A]
                   for w in chain}
        return factored_experts_forward(experts, hidden_states, *args, lora=factors, **kwargs)


def wrapper_chain(module) -> tuple[list[ParamWrapper], torch.nn.Module]:
    """The nested ParamWrappers from `module` inwards, and the experts module they wrap."""
    chain = []
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain, module


def lora_factors(wrapper: ParamWrapper, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [E, r, in], B [E, out, r], scaling) of one adapter, read from peft's layout.

    peft stores lora_A as [E*r, in] with expert-major rows and lora_B as [out, r*E] with
    rank-major columns (ParamWrapper.get_delta_factors); delta_e = scaling * B_e @ A_e.
    """
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    experts = wrapper.num_experts
    a = a.reshape(experts, -1, a.shape[-1])
    b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    return a, b, wrapper.scaling[adapter]


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, in] sorted by expert, weight [E, out, in] -> [S, out], with transformers' grouped_mm dispatch."""
    from transformers.integrations.moe import _grouped_linear

    if weight.shape[-2] * weight.element_size() % 16 or weight.shape[-1] * weight.element_size() % 16:
        # grouped_mm (CPU and CUDA) wants 16-byte strides; a rank such as 4 in bf16 has 8. transformers'
        # own per-expert loop (a registered op with its backward) takes those.
        return torch.ops.transformers.grouped_mm_fallback(x.to(weight.dtype), weight.transpose(-2, -1), offsets)
    return _grouped_linear(x, weight, offsets)


def _project(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, factors) -> torch.Tensor:
    """Base projection plus each adapter's scale * B_e (A_e x), in the base weight's dtype."""
    out = _grouped(x, weight, offsets)
    for a, b, scaling in factors:
        low_rank = _grouped(x, a.to(weight.dtype), offsets)
        out = out + scaling * _grouped(low_rank, b.to(weight.dtype).contiguous(), offsets)
    return out


def factored_experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor, lora: dict) -> torch.Tensor:
    """transformers' grouped_mm experts forward (integrations/moe.py) with LoRA on both projections.

    Tokens are sorted by expert once; both the base weights (dequantized once each) and the
    low-rank factors run as grouped matmuls over the same groups, and the weighted sum over
    the top-k choices is taken like transformers does, so with zero LoRA B the output equals
    the base model's exactly.
    """
    num_experts = experts.num_experts
    num_tokens, hidden_dim = hidden_states.shape
    num_top_k = top_k_index.size(-1)
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // num_top_k]
    weights_g = top_k_weights.reshape(-1)[perm]
    # histc as transformers does (deterministic on CPU and CUDA, no graph break)
    counts_input = expert_ids_g.float() if x.device.type in ("cpu", "mps") else expert_ids_g.int()
    per_expert = torch.histc(counts_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)

    hidden = experts._apply_gate(_project(x, experts.gate_up_proj, offsets, lora.get("gate_up_proj", ())))
    out = _project(hidden, experts.down_proj, offsets, lora.get("down_proj", ()))
    weighted = out * weights_g.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def check_experts_layout(experts) -> None:
    """The factored forward assumes [gate; up] concatenated, [E, out, in] weights, no bias, no EP."""
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
              "_is_expert_parallel": False, "has_post_expert_norm": False}
    wrong = [f"{key}={getattr(experts, key, None)!r}" for key, want in layout.items()
             if getattr(experts, key, want) != want]
    if wrong:
        raise ExpertLoraError(f"{type(experts).__name__} has {', '.join(wrong)}: LoRA on its fused parameters "
                              f"is not supported by this kit; remove lora.target_parameters")


def registration_order(experts) -> list[str]:
    """The order the experts class registers its parameters in (a meta instance tells, no memory)."""
    cls = type(experts)
    if torch.nn.utils.parametrize.is_parametrized(experts):
        cls = cls.__bases__[0]  # parametrize swaps in a subclass named Parametrized<cls>
    with torch.device("meta"):
        fresh = cls(experts.config)
    return [name for name, _ in fresh.named_parameters(recurse=False)]


def use_factored_experts(model) -> int:
    """After get_peft_model: give every experts module's wrappers the factored forward and plain nesting.

    Nesting: on a plain model peft wraps the parameters in registration order (the first one
    innermost), on a parametrized one in sorted-name order. State-dict keys encode the nesting
    (`experts.lora_A` vs `experts.base_layer.lora_A`), so only the plain order gives an adapter
    that `PeftModel.from_pretrained` loads onto a plain model.

    Forward: the wrappers become ExpertLora, which only overrides `forward`. The class is
    swapped after injection because peft recognises its own wrappers by class name while it
    injects. Returns how many experts modules were adapted.
    """
    adapted = 0
    for parent in list(model.modules()):
        if isinstance(parent, ParamWrapper):
            continue
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, ParamWrapper):
                continue
            chain, experts = wrapper_chain(child)
            check_experts_layout(experts)
            by_name = {w.parameter_name: w for w in chain}
            inner = experts
            for name in registration_order(experts):  # innermost first
                if name in by_name:
                    by_name[name].base_layer = inner
                    inner = by_name[name]
            for wrapper in chain:
                wrapper.__class__ = ExpertLora
            setattr(parent, child_name, inner)
            adapted += 1
    return adapted
