"""Serve a trained adapter without merging: the adapter rewritten in the per-expert layout vLLM and SGLang load.

peft's `target_parameters` saves a layer's routed-expert LoRA fused, one A/B pair per 3-D
parameter (`mlp.experts.base_layer.lora_A.weight` [E*r, hidden] for gate_up_proj,
`mlp.experts.lora_A.weight` for down_proj). vLLM's and SGLang's Glm4MoeForCausalLM read
expert LoRA the way they read the Hub checkpoint, per expert and per projection:

    base_model.model.model.layers.N.mlp.experts.E.{gate_proj,up_proj,down_proj}.lora_{A,B}.weight

vLLM 0.32 also reads the fused 3-D layout, exactly, but only when the server is started with
`enable_mixed_moe_lora_format` and the request sets `is_3d_lora_weight` (otherwise it refuses the
adapter with a clear error); SGLang reads per-expert names only. The per-expert layout is the one
both read as they are (vLLM 0.32's own loader reproduces peft's deltas to 3.7e-9), so the export
writes it:

- gate_up_proj's factors are split: gate and up share the expert's A (one input, H) and
  take the first and second half of its B rows ([gate; up], the order the Hub loader fuses).
- down_proj's factors are the expert's slice, as they are.
- Every MoE layer that has expert LoRA gets all three projections for every expert (vLLM
  stacks gate, up and down per expert and requires each): a projection the adapter did not
  train is written as zero factors, which adds nothing.
- The servers apply one scale, lora_alpha / r, and one rank to a whole adapter, while the
  kit's adapter has its own rank and alpha for the experts (`lora.expert_r`, `expert_alpha`).
  So each module's scale is folded into its B, every factor is zero-padded to the largest
  rank, and adapter_config.json says r = lora_alpha = that rank: scale 1 everywhere. The
  padding adds nothing to the output; vLLM allocates max_lora_rank slots per expert anyway.

An adapter without expert LoRA (attention only) is already what the servers load: the export
is a copy of the peft adapter.

The servers pick their model class from the base's config.json: `Glm4MoeForCausalLM` for
GLM-4.5-Air and GLM-4.5/4.6/4.7, `Glm4MoeLiteForCausalLM` for GLM-4.7-Flash, whose multi-head
latent attention vLLM runs with its MLA kernels. The export's README and summary name it. vLLM
does not apply LoRA to MLA's key/value up-projection `kv_b_proj` (vllm-project/vllm#48974, open):
an adapter that trained it would be served without that part, so the export refuses it in one
line and points at `--merge`, which folds every part into the weights. Options the per-expert layout cannot express (DoRA, LoRA bias,
modules_to_save, trainable tokens, ...) are refused in one line before anything is written.
The factors keep the adapter's stored dtype (peft saves fp32); the folding is done in fp32.

The MTP layer: vLLM and SGLang draft speculative tokens with the base checkpoint's MTP layer
(`model.layers.<num_hidden_layers>.*`) and apply a LoRA adapter to the main model only, never to the
draft layer. So an adapter trained with `mtp.train` is exported without its MTP LoRA (it would be
dropped, or refused as an unknown module), and the export's README names the route that does serve
the adapted draft head: `use_adapter.py --merge`, which folds it into the checkpoint's MTP layer.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from glmkit.model.adapter import (
    ADAPTER_PREFIX,
    Delta,
    MergeError,
    _adapter_config,
    _meta_skeleton,
    check_adapter,
    plan_deltas,
)
from glmkit.model.mtp import is_mtp_name

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PARTIAL_MARKER = ".glmkit-export-partial"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_FUSED_KEY = re.compile(r"\.mlp\.experts\.(base_layer\.)*lora_[AB]\.weight$")
# Fused routed-expert parameters the per-expert layout can express, and the Hub projections each becomes.
_FUSED_TO_HUB = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
# peft options with an effect beyond scale * B @ A on a weight: no per-expert LoRA key carries them.
_UNEXPRESSIBLE = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "fan_in_fan_out": "fan_in_fan_out",
                  "modules_to_save": "modules_to_save", "trainable_token_indices": "trainable tokens",
                  "layer_replication": "layer replication"}
# vLLM takes --max-lora-rank from this list only (vllm/config/lora.py, MaxLoRARanks); SGLang takes any rank.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SERVING_README = """\
# {name}: LoRA adapter for serving (exported by glmkit's `use_adapter.py --export-serving`)

Base model: {model_dir} ({architecture}: the class vLLM and SGLang serve it with). Layout: {layout}. Rank {rank}
(a server's max LoRA rank must be at least that).

    vllm serve {model_dir} --enable-lora --max-lora-rank {vllm_rank} --lora-modules {name}={path}
    python -m sglang.launch_server --model-path {model_dir} --enable-lora --max-lora-rank {rank} --lora-paths {name}={path}

Then ask for model "{name}" (vLLM) or pass "lora_path": "{name}" (SGLang).
"""
# Appended to the README when the base model has an MTP layer: what the servers do with it and this adapter.
MTP_README = """
## Speculative decoding with the MTP layer

{model_dir} has a multi-token-prediction layer, which the servers draft with
(vLLM: `--speculative-config.method mtp --speculative-config.num_speculative_tokens 1`; SGLang:
`--speculative-algorithm EAGLE --speculative-num-steps 1 --speculative-eagle-topk 1
--speculative-num-draft-tokens 2`). They load it from the base checkpoint and apply this LoRA to the main
model only, never to the draft layer.
"""
MTP_TRAINED_README = """
The adapter {adapter_dir} also trained the MTP layer (`mtp.train`); that part is not in this export, since no
server would apply it. To serve the adapted draft head, merge instead and serve the merged folder with the
commands above (without `--enable-lora`):

    python use_adapter.py --config {config} --adapter {adapter_dir} --merge MERGED_DIR
    vllm serve MERGED_DIR --speculative-config.method mtp --speculative-config.num_speculative_tokens 1
"""
MTP_UNTRAINED_README = """
The MTP layer was not trained with this adapter: the servers draft with the base model's, which was trained
against the base model's hidden states, so fewer drafts are accepted after continued pre-training (each
set's `mtp_acceptance` in eval_log.jsonl measures by how much). `mtp.train: true` trains it alongside;
its adapter is served through `use_adapter.py --merge`.
"""


# LoRA the servers load but do not apply, by module name: served, the adapter would silently lose it.
UNSERVED_LORA = {"kv_b_proj": "vLLM does not apply LoRA to multi-head latent attention's kv_b_proj "
                              "(vllm-project/vllm#48974)"}


class ServingExportError(ValueError):
    """The adapter can't be written in the serving layout, or the output folder can't take it; one line says why."""


def check_served_whole(adapter_dir: str) -> None:
    """Refuse an adapter with LoRA on a module the servers skip (MLA's kv_b_proj), pointing at the merge."""
    from safetensors import safe_open

    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as fh:
        modules = {key.rsplit(".lora_", 1)[0] for key in fh.keys() if not is_mtp_name(key)}
    for name, why in UNSERVED_LORA.items():
        layers = sorted(m for m in modules if m.endswith(f".{name}"))
        if layers:
            raise ServingExportError(
                f"{adapter_dir} adapts {name} in {len(layers)} layer(s), and {why}: served as an adapter it would "
                f"lose that part; merge it instead (python use_adapter.py --merge OUT_DIR, then serve OUT_DIR), or "
                f"train without it (lora.target_modules: [q_a_proj, q_b_proj, kv_a_proj_with_mqa, o_proj])")


def base_architecture(model_dir: str) -> str:
    """The model class config.json names, the one vLLM and SGLang serve the base with."""
    from glmkit.hub.verify import architecture_of

    return architecture_of(model_dir)


def check_expressible(config: dict, adapter_dir: str) -> None:
    """Refuse peft options and fused parameters that per-expert LoRA keys cannot carry."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ServingExportError(f"{adapter_dir} is a {config.get('peft_type')} adapter; the serving export writes "
                                 f"LoRA adapters only")
    used = [label for key, label in _UNEXPRESSIBLE.items() if config.get(key)]
    if used:
        raise ServingExportError(f"{adapter_dir} uses {', '.join(used)}, which per-expert LoRA keys cannot express "
                                 f"(vLLM and SGLang serve plain LoRA: scale * B @ A on a weight)")
    for name in config.get("target_parameters") or []:
        if name.rsplit(".", 1)[-1] not in _FUSED_TO_HUB:
            raise ServingExportError(f"{adapter_dir} adapts the parameter {name}; the serving layout has per-expert "
                                     f"keys for experts.gate_up_proj and experts.down_proj only")


def export_for_serving(model_dir: str, adapter_dir: str, out_dir: str, config_path: str | None = None) -> dict:
    """Write adapter_dir's LoRA to out_dir in the layout vLLM / SGLang load; return a summary of what was written.
    `config_path`: the training config, for the merge command the README names when the MTP layer was trained."""
    check_adapter(adapter_dir)
    config = _adapter_config(adapter_dir)
    check_expressible(config, adapter_dir)
    check_served_whole(adapter_dir)
    architecture = base_architecture(model_dir)
    mtp_trained = _has_mtp_lora(adapter_dir)
    if config.get("target_parameters") or _has_fused_expert_factors(adapter_dir):
        tensors, serving_config, summary = per_expert_adapter(model_dir, adapter_dir, config)
    elif mtp_trained:
        tensors, serving_config, summary = trunk_adapter(adapter_dir, config)
    else:
        tensors, serving_config = None, None
        ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
        summary = {"layout": "plain peft adapter (no routed-expert LoRA)", "rank": max(ranks), "tensors": None,
                   "expert_layers": 0}
    vllm_rank = vllm_max_lora_rank(summary["rank"])
    partial = _prepare_output(out_dir, model_dir, adapter_dir)  # only once the adapter is known to be expressible
    if tensors is None:  # no expert LoRA: the peft adapter is what the servers read; its two files unchanged
        for name in ADAPTER_FILES:
            shutil.copyfile(os.path.join(adapter_dir, name), os.path.join(partial, name))
    else:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(partial, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(partial, "adapter_config.json"), "w", encoding="utf-8") as fh:
            json.dump(serving_config, fh, indent=2)
    name = os.path.basename(os.path.abspath(out_dir).rstrip(os.sep))
    with open(os.path.join(partial, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(SERVING_README.format(name=name, model_dir=model_dir, rank=summary["rank"],
                                       vllm_rank=vllm_rank, path=os.path.abspath(out_dir),
                                       layout=summary["layout"], architecture=architecture))
        if _base_has_mtp(model_dir):
            fh.write(MTP_README.format(model_dir=model_dir))
            fh.write(MTP_TRAINED_README.format(adapter_dir=adapter_dir, config=config_path or "CONFIG.yaml")
                     if mtp_trained else MTP_UNTRAINED_README)
    os.remove(os.path.join(partial, PARTIAL_MARKER))
    os.replace(partial, out_dir)  # an empty out_dir is replaced; a non-empty one was refused
    return {**summary, "out_dir": out_dir, "mtp_lora_left_out": mtp_trained, "architecture": architecture}


def _has_mtp_lora(adapter_dir: str) -> bool:
    """Whether the adapter holds LoRA on the MTP layer (trained with mtp.train)."""
    from safetensors import safe_open

    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as fh:
        return any(is_mtp_name(key) for key in fh.keys())


def _base_has_mtp(model_dir: str) -> bool:
    from glmkit.hub.mtp_layout import announced_mtp_layers

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        return announced_mtp_layers(json.load(fh)) > 0


def trunk_adapter(adapter_dir: str, config: dict) -> tuple[dict, dict, dict]:
    """(tensors, adapter_config, summary): the peft adapter without its MTP LoRA (no expert LoRA to rewrite)."""
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(os.path.join(adapter_dir, "adapter_model.safetensors")).items()
               if not is_mtp_name(k)}
    trunk_config = {**config, "target_parameters": [p for p in config.get("target_parameters") or []
                                                     if not is_mtp_name(p)] or None}
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    summary = {"layout": "plain peft adapter (no routed-expert LoRA), without its MTP LoRA", "rank": max(ranks),
               "tensors": len(tensors), "expert_layers": 0}
    return tensors, trunk_config, summary


def _has_fused_expert_factors(adapter_dir: str) -> bool:
    """Whether the adapter file holds peft's fused expert factors, whatever its config says."""
    from safetensors import safe_open

    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as fh:
        return any(_FUSED_KEY.search(key) for key in fh.keys())


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    fits = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if not fits:
        raise ServingExportError(f"the adapter's rank {rank} is above vLLM's largest --max-lora-rank "
                                 f"({VLLM_MAX_LORA_RANKS[-1]})")
    return fits[0]


def per_expert_adapter(model_dir: str, adapter_dir: str, config: dict) -> tuple[dict, dict, dict]:
    """(tensors, adapter_config, summary) of the per-expert export, in memory; nothing is written."""
    from safetensors import safe_open

    from glmkit.model.load import load_model_config

    skeleton = _meta_skeleton(load_model_config(model_dir))
    try:
        deltas = plan_deltas(adapter_dir, skeleton, model_dir)
    except MergeError as exc:
        raise ServingExportError(str(exc)) from None
    deltas = [d for d in deltas if not is_mtp_name(d.target)]  # no server applies LoRA to the MTP draft layer
    rank = max(d.rank for d in deltas)
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    by_layer: dict[str, dict[str, Delta]] = {}
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as fh:
        stored = fh.get_slice(deltas[0].a_key).get_dtype()
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)
        for d in deltas:
            if d.experts:
                experts_module, _, fused = d.target.rpartition(".")
                by_layer.setdefault(experts_module, {})[fused] = d
                continue
            _put(tensors, d.target, fh.get_tensor(d.a_key).float(), d.scaling * fh.get_tensor(d.b_key).float(),
                 rank, dtype)
            modules.append(d.target)
        for experts_module, fused in sorted(by_layer.items()):
            shapes = _expert_shapes(skeleton, experts_module)
            per_expert = {hub: _expert_factors(fh, d, hub) for name, d in fused.items() for hub in _FUSED_TO_HUB[name]}
            for e in range(next(iter(fused.values())).experts):
                for proj in PROJECTIONS:
                    module = f"{experts_module}.{e}.{proj}"
                    if proj in per_expert:
                        a, b = per_expert[proj]
                        _put(tensors, module, a[e], b[e], rank, dtype)
                    else:  # not trained: zero factors, so the server's gate/up/down stack is complete
                        out_features, in_features = shapes[proj]
                        _put(tensors, module, torch.zeros(rank, in_features), torch.zeros(out_features, rank),
                             rank, dtype)
                    modules.append(module)
    serving_config = {**config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
                      "alpha_pattern": {}, "target_modules": modules, "target_parameters": None}
    summary = {"layout": "per-expert (experts.E.gate_proj / up_proj / down_proj)", "rank": rank,
               "tensors": len(tensors), "expert_layers": len(by_layer)}
    return tensors, serving_config, summary


def _expert_factors(fh, d: Delta, hub: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [E, r, in], scale * B [E, out, r]) of one Hub projection from peft's fused factors.

    peft stores lora_A as [E*r, in] with expert-major rows and lora_B as [out, r*E] with
    rank-major columns; gate_up_proj's out rows are [gate; up].
    """
    a = fh.get_tensor(d.a_key).float().reshape(d.experts, d.rank, -1)
    b = fh.get_tensor(d.b_key).float()
    b = b.reshape(b.shape[0], d.rank, d.experts).permute(2, 0, 1) * d.scaling
    if hub in ("gate_proj", "up_proj"):
        half = b.shape[1] // 2
        b = b[:, :half] if hub == "gate_proj" else b[:, half:]
    return a, b


def _expert_shapes(skeleton, experts_module: str) -> dict[str, tuple[int, int]]:
    """(out, in) of one expert's gate, up and down projection, from the fused parameters' shapes."""
    experts = skeleton.get_submodule(experts_module)
    _, two_inter, hidden = experts.gate_up_proj.shape
    return {"gate_proj": (two_inter // 2, hidden), "up_proj": (two_inter // 2, hidden),
            "down_proj": tuple(experts.down_proj.shape[1:])}


def _put(tensors: dict, module: str, a: torch.Tensor, b: torch.Tensor, rank: int, dtype: torch.dtype) -> None:
    """A [r, in] and B [out, r], zero-padded to `rank`, under peft's key names.

    Each is a copy of its own: unpadded, an expert's A is a view of the fused factor that gate and up share
    (and so is every other expert's), and safetensors refuses tensors that share memory."""
    r = a.shape[0]
    if r < rank:
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    tensors[f"{ADAPTER_PREFIX}{module}.lora_A.weight"] = a.to(dtype, memory_format=torch.contiguous_format, copy=True)
    tensors[f"{ADAPTER_PREFIX}{module}.lora_B.weight"] = b.to(dtype, memory_format=torch.contiguous_format, copy=True)


def _prepare_output(out_dir: str, model_dir: str, adapter_dir: str) -> str:
    """Refuse a folder that holds anything; make and return the partial folder the export is written in."""
    out_dir = os.path.abspath(out_dir)
    for other, what in ((adapter_dir, "the adapter folder"), (model_dir, "the base model folder")):
        if os.path.realpath(out_dir) == os.path.realpath(other):
            raise ServingExportError(f"--export-serving {out_dir} is {what}; choose a new folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ServingExportError(f"--export-serving {out_dir} is a file; choose a new folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ServingExportError(f"--export-serving {out_dir} is not empty; choose a new or empty folder "
                                 f"(nothing is overwritten)")
    partial = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.export-partial")
    if os.path.exists(partial):
        if not os.path.isfile(os.path.join(partial, PARTIAL_MARKER)):
            raise ServingExportError(f"{partial} exists and was not written by an export; move it away")
        shutil.rmtree(partial)  # an interrupted export's leftovers: ours to remove
    os.makedirs(partial)
    open(os.path.join(partial, PARTIAL_MARKER), "w").close()
    return partial
