"""LoRA: what it adapts (every configured name checked against the model), the peft config, the wrap.

peft matches `target_modules` / `target_parameters` by full name or dotted suffix and skips a
name that matches nothing with a warning at most, so a typo trains a different adapter than
asked for. The kit resolves every listed name itself, on the meta-device skeleton before a
weight is read (glmkit.model.load.check_model_dir) and again on the loaded model, and refuses the
run naming the key and what the model has instead.

`attention` in `lora.target_modules` stands for every projection of the model's attention, whatever its
kind: q_proj, k_proj, v_proj, o_proj in GLM-4.5-Air's (and GLM-4.5/4.6/4.7's) grouped-query attention;
q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj in GLM-4.7-Flash's multi-head latent
attention (MLA). It is the shipped recipes' setting, so one config adapts either model the same way. A
list written for one kind of attention and run on the other is refused in one line naming what it would
adapt: q/k/v/o on MLA matches only o_proj, which peft would silently train alone.

Attention (and other Linear) targets go to peft as listed (`attention` as the names it stands for).
Routed-expert targets go to peft as full parameter names, which is how it finds a 4-bit parametrized
tensor, with their own rank and alpha (`lora.expert_r` / `lora.expert_alpha`) as a `rank_pattern` /
`alpha_pattern` a plain `PeftModel.from_pretrained` honours too; glmkit.model.expert_lora supplies their
forward.

The MTP layer (glmkit/model/mtp.py) gets the same targets when `mtp.train` is on; otherwise it is set
aside while peft wraps the model, so the adapter is exactly what it would be for a model without one.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass

from torch import nn

from glmkit.model.errors import LoraTargetError
from glmkit.model.mtp import is_mtp_name, set_aside

ALL_LINEAR = "all-linear"
ATTENTION = "attention"
# The attention projections of each kind of attention the kit trains, as transformers names them.
ATTENTION_KINDS = {
    "grouped-query attention (GLM-4.5-Air, GLM-4.5/4.6/4.7": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "multi-head latent attention (GLM-4.7-Flash": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
}
KNOWN_ATTENTION_NAMES = {name for names in ATTENTION_KINDS.values() for name in names}


@dataclass
class LoraTargets:
    modules: list[str]        # full names of the Linear modules to adapt
    expert_params: list[str]  # full names of the fused 3-D routed-expert parameters to adapt
    peft_modules: list[str]   # what peft's target_modules gets: the names as listed, `attention` spelled out


def matches(name: str, targets) -> bool:
    """peft's rule for a list of names: the full name, or its last dotted components."""
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def expert_parameters(model) -> dict[str, tuple]:
    """{full name: logical shape} of every fused 3-D routed-expert parameter, 4-bit or not."""
    found = {}
    for module_name, module in model.named_modules():
        if ".mlp.experts" not in f".{module_name}" or not module_name.endswith("experts"):
            continue
        for attr, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                found[f"{module_name}.{attr}"] = tuple(param.shape)
        for attr, plist in getattr(module, "parametrizations", {}).items():
            states = [p.quant_state for p in plist if getattr(p, "quant_state", None) is not None]
            shape = tuple(states[0].shape) if states else tuple(plist.original.shape)
            if len(shape) == 3:
                found[f"{module_name}.{attr}"] = shape
    return found


def _suffixes(names, depth: int) -> str:
    return ", ".join(sorted({".".join(n.split(".")[-depth:]) for n in names}))


def attention_projections(model) -> list[str]:
    """The names of the Linear layers in the model's attention (decoder layers'), in the order the model has them:
    q_proj, k_proj, v_proj, o_proj (grouped-query) or the five MLA projections (GLM-4.7-Flash)."""
    found = []
    for name in linear_modules(model):
        parent, _, leaf = name.rpartition(".")
        if parent.endswith("self_attn") and not is_mtp_name(name) and leaf not in found:
            found.append(leaf)
    return found


def attention_kind(projections: list[str]) -> str:
    """How the messages name the model's attention, from its projections: "multi-head latent attention
    (GLM-4.7-Flash: q_a_proj, ...)"."""
    kind = next((k for k, names in ATTENTION_KINDS.items() if set(names) == set(projections)), "attention (")
    return f"{kind}{': ' if not kind.endswith('(') else ''}{', '.join(projections)})"


def peft_module_names(model, target_modules) -> list[str]:
    """lora.target_modules with `attention` spelled out as the model's attention projections (listed once)."""
    names = []
    for target in target_modules:
        for name in attention_projections(model) if target == ATTENTION else [target]:
            if name not in names:
                names.append(name)
    return names


def _attention_mismatch(model, linears: list[str], listed: list[str]) -> str | None:
    """One line when the list names attention projections this model's attention does not have (a list written
    for the other kind of attention), saying which of its projections the list would adapt."""
    foreign = [t for t in listed if t in KNOWN_ATTENTION_NAMES and not any(matches(n, [t]) for n in linears)]
    if not foreign:
        return None
    projections = attention_projections(model)
    covered = peft_module_names(model, [t for t in listed if t not in foreign])
    adapted = [p for p in projections if p in covered]
    named = f"lora.target_modules [{', '.join(listed)}]"
    nothing = f"{', '.join(foreign)} {'matches' if len(foreign) == 1 else 'match'} nothing here"
    if adapted == projections:
        return (f"{named}: {nothing}, in this model's {attention_kind(projections)}; remove "
                f"{'it' if len(foreign) == 1 else 'them'}")
    would = f"only {', '.join(adapted)}" if adapted else "none"
    return (f"{named} would adapt {would} of this model's attention, which is {attention_kind(projections)}: "
            f"{nothing}; set lora.target_modules to [attention] (every projection of the model's attention) or "
            f"list the ones to adapt")


def resolve_targets(model, lora, train_mtp: bool = False) -> LoraTargets:
    """Every name in lora.target_modules / lora.target_parameters must match; raise naming the key.
    The MTP layer's modules count only with `train_mtp`."""
    linears = [n for n in linear_modules(model) if train_mtp or not is_mtp_name(n)]
    experts = {n: shape for n, shape in expert_parameters(model).items() if train_mtp or not is_mtp_name(n)}
    problems = []
    listed = list(lora.target_modules)
    mismatch = _attention_mismatch(model, linears, listed)
    if mismatch:
        raise LoraTargetError(mismatch)
    wanted = peft_module_names(model, listed)
    modules = []
    if ALL_LINEAR in wanted:
        modules = [n for n in linears if not n.endswith("lm_head")]
    for target in (t for t in wanted if t != ALL_LINEAR):
        hits = [n for n in linears if matches(n, [target])]
        if not hits:
            problems.append(f"lora.target_modules: {target!r} matches no Linear layer of the model; "
                            f"it has {_suffixes(linears, 1)}")
        modules += [n for n in hits if n not in modules]
    params = []
    for target in lora.target_parameters:
        hits = [n for n in experts if matches(n, [target])]
        if not hits:
            have = _suffixes(experts, 3) or "none (no fused routed experts)"
            problems.append(f"lora.target_parameters: {target!r} matches no fused routed-expert parameter of the "
                            f"model; it has {have}")
        params += [n for n in hits if n not in params]
    if problems:
        raise LoraTargetError("; ".join(problems))
    return LoraTargets(modules=[n for n in linears if n in modules], expert_params=sorted(params), peft_modules=wanted)


def expert_rank(lora) -> tuple[int, int]:
    """(rank, alpha) of the routed-expert adapters: their own when set, else the attention ones."""
    return lora.expert_r or lora.r, lora.expert_alpha or lora.alpha


def peft_config(lora, targets: LoraTargets):
    """The LoraConfig for peft: the listed modules, the experts by full name with their own rank."""
    from peft import LoraConfig

    r, alpha = expert_rank(lora)
    # get_pattern_key matches `(.*\.)?(KEY)$`: escaped full names touch these parameters and nothing else.
    rank_pattern = {re.escape(n): r for n in targets.expert_params} if r != lora.r else {}
    alpha_pattern = {re.escape(n): alpha for n in targets.expert_params} if alpha != lora.alpha else {}
    # "all-linear" is peft's shorthand only as the whole value: with other names beside it, pass what it resolved to
    modules = targets.modules if ALL_LINEAR in lora.target_modules else targets.peft_modules
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=modules or [], target_parameters=list(targets.expert_params) or None,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, bias="none", task_type="CAUSAL_LM")
    return config


def apply_lora(model, lora, train_mtp: bool = False):
    """Wrap `model` with peft LoRA on the resolved targets (the MTP layer's with `train_mtp`); the adapter loads into
    a plain model too."""
    import warnings

    from peft import get_peft_model

    from glmkit.model.expert_lora import use_factored_experts

    targets = resolve_targets(model, lora, train_mtp)
    config = peft_config(lora, targets)
    with warnings.catch_warnings(), nullcontext() if train_mtp else set_aside(model):
        # peft checks the patterns against module names only and warns that the parameter patterns "did not
        # match any targeted module and were ignored"; they are applied (the expert shapes show the rank).
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        model = get_peft_model(model, config)
    use_factored_experts(model)
    return model
