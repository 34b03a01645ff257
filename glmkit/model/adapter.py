"""Using a trained adapter: merge it into the base checkpoint shard by shard, or generate with it (a plain
continuation, or a chat reply rendered with the model's own chat template).

The merge never holds the model: for each base shard it reads the tensors, folds in the LoRA
deltas that touch them (attention and other Linear layers: scale * B @ A; routed experts: one
expert's scale * B_e @ A_e at a time, from the fused adapter's factors), and writes the shard.
Peak memory is about one shard plus the adapter factors of the layers in it, never the
210 GB bf16 GLM-4.5-Air. The output keeps the base's layout, which for GLM-4.5-Air is the
Hub's per-expert one (`model.layers.N.mlp.experts.E.gate_proj.weight`, ...), with an index,
config and tokenizer, so transformers, vLLM and SGLang load it like the original.

An adapter trained with `mtp.train` also adapts the MTP layer (its LoRA under MtpModel's names,
glmkit/model/mtp.py); the merge folds that into `model.layers.<num_hidden_layers>.*`, where the servers'
MTP speculative decoding (and transformers' `generate(use_mtp=True)`) read the draft head.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass

import torch

from glmkit.model.mtp import num_mtp_layers
from glmkit.run.writes import guarded_write

ADAPTER_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
PARTIAL_MARKER = ".glmkit-merge-partial"
_PER_EXPERT = re.compile(r"^(?P<experts>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
# Options whose effect is not a plain scale * B @ A on a weight: the merge refuses them rather than drop them.
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "fan_in_fan_out": "fan_in_fan_out",
                "modules_to_save": "modules_to_save", "trainable_token_indices": "trainable tokens",
                "layer_replication": "layer replication"}


class MergeError(ValueError):
    """The adapter, the base or the output folder can't be merged as asked; one line says why."""


def check_adapter(adapter_dir: str) -> None:
    """Refuse a damaged adapter folder in one line naming the file, before anything reads it.

    The kit's folders (the best adapter, a checkpoint) list every file's size and sha256 in their marker
    (glmkit/run/manifest.py): a power cut's zeros or a cut-short file fail that. Any folder's weights file
    must also hold together as safetensors (its header and extent), which a cut-short one does not."""
    from glmkit.hub.shards import check_file
    from glmkit.run.manifest import adapter_folder_problem

    problem = adapter_folder_problem(adapter_dir)
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if problem is None and os.path.isfile(weights):
        problem = check_file(weights)
        problem = problem and f"adapter_model.safetensors: {problem}"
    if problem:
        raise MergeError(f"the adapter {adapter_dir} is damaged: {problem}; point --adapter at another copy of it "
                         f"(each checkpoint-N folder of the run holds its step's adapter)")


def load_base_with_adapter(model_dir: str, adapter_dir: str, dtype=torch.bfloat16):
    """The base model in `dtype` (not 4-bit) with the adapter on top, as plain transformers + peft load it."""
    from peft import PeftModel

    check_adapter(adapter_dir)
    check_fits(model_dir, adapter_dir, merging=False)  # a mismatch is one line, as for --merge, not a peft traceback
    checkpoint_weight_map(model_dir)  # every shard the index names checked (in this folder, whole), as --merge does
    base = load_plain_model(model_dir, dtype)
    return PeftModel.from_pretrained(base, adapter_dir), _tokenizer(model_dir, adapter_dir)


def load_plain_model(model_dir: str, dtype=torch.bfloat16):
    """The model as transformers' `from_pretrained` loads it, without its MTP layer. transformers skips GLM's
    (`model.layers.46.*` / `92.*`) by name without a word; a checkpoint whose MTP layer sits at another index
    (the tiny models', GLM-4.7-Flash's) it reports key by key as UNEXPECTED, which reads like damage. Those
    keys are skipped the same way here, for this load only."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(model_dir)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    skipped = [rf"model\.layers\.{config.num_hidden_layers + i}\." for i in range(num_mtp_layers(config))]
    usual = model_class._keys_to_ignore_on_load_unexpected
    model_class._keys_to_ignore_on_load_unexpected = [*(usual or []), *skipped]
    try:
        return model_class.from_pretrained(model_dir, dtype=dtype)
    finally:
        model_class._keys_to_ignore_on_load_unexpected = usual


def _tokenizer(model_dir: str, adapter_dir: str):
    from transformers import AutoTokenizer

    has_own = os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(adapter_dir if has_own else model_dir)


def _adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(adapter_dir, "adapter_model.safetensors")):
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json / adapter_model.safetensors; point "
                                f"--adapter at a checkpoint folder or paths.best_adapter_dir")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ---------------------------------------------------------------------------
# What the adapter changes: one entry per adapted Linear module or fused expert parameter
# ---------------------------------------------------------------------------

@dataclass
class Delta:
    target: str     # module name (Linear) or full parameter name (fused experts), as in the model
    a_key: str      # adapter tensor names
    b_key: str
    scaling: float
    experts: int    # 0 for a Linear; else the number of experts the factors hold
    rank: int


def _scaling(config: dict, name: str) -> tuple[int, float]:
    from peft.utils.other import get_pattern_key

    r = config.get("rank_pattern", {}).get(get_pattern_key(config.get("rank_pattern", {}).keys(), name), config["r"])
    alpha = config.get("alpha_pattern", {}).get(get_pattern_key(config.get("alpha_pattern", {}).keys(), name),
                                                config["lora_alpha"])
    return r, alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def _experts_order(skeleton, experts_module: str) -> list[str]:
    from glmkit.model.expert_lora import registration_order

    return registration_order(skeleton.get_submodule(experts_module))


def check_fits(model_dir: str, adapter_dir: str, merging: bool) -> list[Delta]:
    """The adapter's deltas against the model's shapes (a meta skeleton: no weights are read); MergeError or
    ModelLoadError in one line when they do not fit. `merging` also refuses options a merge cannot fold."""
    from glmkit.model.load import load_model_config

    return plan_deltas(adapter_dir, _meta_skeleton(load_model_config(model_dir)), model_dir, merging)


def plan_deltas(adapter_dir: str, skeleton, model_dir: str, merging: bool = True) -> list[Delta]:
    """Map every adapter tensor to the base weight it changes; MergeError on anything that doesn't fit."""
    from safetensors import safe_open

    from glmkit.model.lora import expert_parameters, matches

    config = _adapter_config(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{adapter_dir} is a {config.get('peft_type')} adapter; the merge folds LoRA adapters")
    used = [label for key, label in _UNSUPPORTED.items() if config.get(key)]
    if used and merging:
        raise MergeError(f"{adapter_dir} uses {', '.join(used)}, which the merge cannot fold into plain weights")
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as fh:
        shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    modules = {}
    for key in shapes:
        if not key.startswith(ADAPTER_PREFIX) or not re.search(r"\.lora_[AB]\.weight$", key):
            raise MergeError(f"{adapter_dir} holds {key}, which is not a LoRA A/B weight; the merge would drop it")
        modules.setdefault(key[len(ADAPTER_PREFIX):].rsplit(".lora_", 1)[0], set()).add(key)

    experts = expert_parameters(skeleton)
    linears = {name: m for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    targeted = [n for n in experts if matches(n, config.get("target_parameters") or [])]
    experts_modules = {n.rpartition(".")[0] for n in experts}
    deltas = []
    for module in sorted(modules):
        a_key, b_key = f"{ADAPTER_PREFIX}{module}.lora_A.weight", f"{ADAPTER_PREFIX}{module}.lora_B.weight"
        if a_key not in shapes or b_key not in shapes:
            raise MergeError(f"{adapter_dir} has only half of {module}'s LoRA weights")
        a_shape, b_shape = shapes[a_key], shapes[b_key]
        owner = module.replace(".base_layer", "")
        depth = module.count(".base_layer")
        if owner in linears and depth == 0:
            r, scaling = _scaling(config, owner)
            want = (linears[owner].out_features, linears[owner].in_features)
            if (b_shape[0], a_shape[1]) != want or a_shape[0] != r or b_shape[1] != r:
                raise MergeError(f"the adapter does not fit {model_dir}: {owner}.weight is {list(want)} there, the "
                                 f"adapter's LoRA is for {[b_shape[0], a_shape[1]]} at rank {a_shape[0]}")
            deltas.append(Delta(owner, a_key, b_key, scaling, 0, r))
            continue
        # A fused-experts module: which of its parameters this wrapper adapts follows from the nesting depth.
        params = [p for p in _experts_order(skeleton, owner) if f"{owner}.{p}" in targeted] \
            if owner in experts_modules else []
        if depth >= len(params):
            raise MergeError(f"the adapter does not fit {model_dir}: it adapts {module}, which that model does not "
                             f"have (or its adapter_config.json does not list it in target_parameters)")
        name = f"{owner}.{params[len(params) - 1 - depth]}"  # peft nests the first-registered innermost
        num_experts, rows, cols = experts[name]
        r, scaling = _scaling(config, name)
        # ParamWrapper: [E, 2I, H] -> in H, out 2I (peft swaps them for 3-D non-transposed weights)
        if a_shape != (r * num_experts, cols) or b_shape != (rows, r * num_experts):
            raise MergeError(f"the adapter does not fit {model_dir}: {name} is {[num_experts, rows, cols]} there, "
                             f"the adapter's factors are {list(a_shape)} and {list(b_shape)} at rank {r}")
        deltas.append(Delta(name, a_key, b_key, scaling, num_experts, r))
    return deltas


class _Factors:
    """Adapter tensors read on demand from adapter_model.safetensors, a few layers' worth kept."""

    def __init__(self, path: str, keep: int = 8):
        self.path, self.keep, self.cache = path, keep, OrderedDict()

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.cache:
            with safe_open(self.path, framework="pt") as fh:
                self.cache[key] = fh.get_tensor(key).float()
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]


class _DeltaFinder:
    """The fp32 delta for one base tensor name (Linear weight or one expert's gate/up/down), or None.

    Keyed by the checkpoint's names: the MTP layer's targets (MtpModel's names) as the Hub stores them."""

    def __init__(self, deltas: list[Delta], factors: _Factors, num_hidden_layers: int):
        from glmkit.model.mtp import hub_name

        self.factors = factors
        self.linear = {hub_name(f"{d.target}.weight", num_hidden_layers): d for d in deltas if not d.experts}
        self.fused = {hub_name(d.target, num_hidden_layers): d for d in deltas if d.experts}

    def targets(self) -> set[str]:
        return set(self.linear) | set(self.fused)

    def __call__(self, key: str) -> tuple[torch.Tensor, str] | None:
        if key in self.linear:
            d = self.linear[key]
            return d.scaling * (self.factors.get(d.b_key) @ self.factors.get(d.a_key)), d.target
        match = _PER_EXPERT.match(key)
        if match is None:
            return None
        fused = "down_proj" if match["proj"] == "down_proj" else "gate_up_proj"
        d = self.fused.get(f"{match['experts']}.{fused}")
        if d is None:
            return None
        e = int(match["expert"])
        a = self.factors.get(d.a_key).reshape(d.experts, d.rank, -1)[e]               # [r, in]
        b = self.factors.get(d.b_key).reshape(-1, d.rank, d.experts)[:, :, e]         # [out, r]
        if fused == "gate_up_proj":  # rows [gate; up], gate first (the loader's fuse order)
            half = b.shape[0] // 2
            b = b[:half] if match["proj"] == "gate_proj" else b[half:]
        return d.scaling * (b @ a), d.target


# ---------------------------------------------------------------------------
# The streaming merge
# ---------------------------------------------------------------------------

def _check_output(out_dir: str, model_dir: str) -> str:
    """Refuse a folder that holds anything (a model above all); return the partial folder to write in."""
    out_dir = os.path.abspath(out_dir)
    if os.path.realpath(out_dir) == os.path.realpath(model_dir):
        raise MergeError(f"--merge {out_dir} is the base model folder; choose a new folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        model_files = [f for f in os.listdir(out_dir) if f.endswith(".safetensors") or f in ("config.json", INDEX)]
        what = f"already holds a model ({', '.join(sorted(model_files)[:3])})" if model_files else "is not empty"
        raise MergeError(f"--merge {out_dir} {what}; choose a new or empty folder (nothing is overwritten)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MergeError(f"--merge {out_dir} is a file; choose a new folder")
    partial = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.merge-partial")
    if os.path.exists(partial):
        if not os.path.isfile(os.path.join(partial, PARTIAL_MARKER)):
            raise MergeError(f"{partial} exists and was not written by a merge; move it away")
        shutil.rmtree(partial)  # an interrupted merge's leftovers: ours to remove
    return partial


def _out_dtype(stored: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    """Floating tensors in `wanted`, except that nothing stored wider is narrowed (fp32 router bias)."""
    if wanted is None or not stored.is_floating_point or stored.itemsize > wanted.itemsize:
        return stored
    return wanted


def merge(model_dir: str, adapter_dir: str, out_dir: str, dtype: torch.dtype | None = torch.bfloat16,
          progress=None) -> str:
    """Fold the adapter into the base checkpoint shard by shard; write a standard checkpoint to out_dir."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from glmkit.model.load import load_model_config

    load_model_config(model_dir)  # first: a folder that holds no GLM model at all
    check_adapter(adapter_dir)  # then an adapter damaged since it was written
    weight_map = checkpoint_weight_map(model_dir)  # then a base that disagrees with itself is the thing to fix
    deltas = check_fits(model_dir, adapter_dir, merging=True)
    finder = _DeltaFinder(deltas, _Factors(os.path.join(adapter_dir, "adapter_model.safetensors")),
                          _num_hidden_layers(model_dir))
    _check_base_has_targets(finder, weight_map, model_dir)
    partial = _check_output(out_dir, model_dir)

    def writing():  # every write of the merge: one line on failure, the partial folder removed
        return guarded_write("the merged model", os.path.abspath(out_dir), partial=partial,
                             intact=f"the base model in {model_dir} and the adapter {adapter_dir} are untouched",
                             fix="rerun --merge")

    with writing():
        os.makedirs(partial)
        open(os.path.join(partial, PARTIAL_MARKER), "w").close()

    touched: set[str] = set()
    total_bytes = 0
    shards = sorted(set(weight_map.values()))
    for number, shard in enumerate(shards, 1):
        merged = {}
        with safe_open(os.path.join(model_dir, shard), framework="pt") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                stored = tensor.dtype
                found = finder(key)
                if found is not None:
                    delta, target = found
                    tensor = tensor.float().add_(delta)  # fold in fp32, round once
                    touched.add(target)
                merged[key] = tensor.to(_out_dtype(stored, dtype)).contiguous()
                total_bytes += merged[key].numel() * merged[key].element_size()
        with writing():
            save_file(merged, os.path.join(partial, shard), metadata={**metadata, "format": "pt"})
        del merged
        if progress:
            progress(number, len(shards), shard)
    missing = {d.target for d in deltas} - touched
    if missing:  # cannot happen after _check_base_has_targets; a guard against writing a half-merged model
        raise MergeError(f"{len(missing)} adapted weights were not found in {model_dir} (first: {sorted(missing)[0]})")
    with writing():
        with open(os.path.join(partial, INDEX), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, fh,
                      indent=2)
        _write_config_and_tokenizer(model_dir, adapter_dir, partial, dtype)
        os.remove(os.path.join(partial, PARTIAL_MARKER))
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.replace(partial, out_dir)  # an empty out_dir is replaced; a non-empty one was refused above
    return out_dir


def checkpoint_weight_map(model_dir: str) -> dict[str, str]:
    """{tensor: shard file} of a checkpoint, after every shard's header checked against its index and its
    config.json checked against its weights about the MTP layer."""
    from safetensors import safe_open

    from glmkit.hub.mtp_layout import mtp_problem
    from glmkit.hub.verify import check_weights, shard_map

    problems = check_weights(model_dir)
    if problems:
        path, problem = problems[0]
        raise MergeError(f"{path}: {problem}; `python download_model.py --verify-only` lists what to fix")
    by_shard, _ = shard_map(model_dir)
    if list(by_shard.values()) == [[]]:  # one unsharded file: its header lists the tensors
        (single,) = by_shard
        with safe_open(os.path.join(model_dir, single), framework="pt") as fh:
            weight_map = {key: single for key in fh.keys()}
    else:
        weight_map = {tensor: shard for shard, tensors in by_shard.items() for tensor in tensors}
    # A merged model that announces an MTP layer it lacks (or the reverse) would fail in the server, not here.
    problem = mtp_problem(_config_json(model_dir), weight_map)
    if problem:
        raise MergeError(f"{os.path.join(model_dir, 'config.json')} {problem}")
    return weight_map


def _config_json(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _num_hidden_layers(model_dir: str) -> int:
    return int(_config_json(model_dir)["num_hidden_layers"])


def _meta_skeleton(config):
    """The model's module tree with shapes only: names, Linear sizes, fused expert shapes, the MTP layer."""
    from transformers import AutoModelForCausalLM

    from glmkit.model.mtp import attach_mtp_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        attach_mtp_layers(model)
    return model


def _check_base_has_targets(finder: _DeltaFinder, weight_map: dict, model_dir: str) -> None:
    """Every adapted weight must be in the checkpoint (experts per expert, as on the Hub) before anything is written."""
    found: dict[str, int] = {}
    for key in weight_map:
        target = _peek(finder, key)
        if target is not None:
            found[target] = found.get(target, 0) + 1
    wanted = {key: 1 for key in finder.linear}
    wanted.update({name: d.experts * (1 if name.endswith("down_proj") else 2) for name, d in finder.fused.items()})
    missing = sorted(name for name, count in wanted.items() if found.get(name, 0) != count)
    if missing:
        raise MergeError(f"the adapter does not fit {model_dir}: its checkpoint lacks tensors of {missing[0]} "
                         f"({len(missing)} adapted weights incomplete; routed experts must be stored per expert, "
                         f"as on the Hub)")


def _peek(finder: _DeltaFinder, key: str) -> str | None:
    """The adapted weight a checkpoint key belongs to, without computing its delta."""
    if key in finder.linear:
        return key
    match = _PER_EXPERT.match(key)
    if match is None:
        return None
    fused = f"{match['experts']}.{'down_proj' if match['proj'] == 'down_proj' else 'gate_up_proj'}"
    return fused if fused in finder.fused and int(match["expert"]) < finder.fused[fused].experts else None


def _write_config_and_tokenizer(model_dir: str, adapter_dir: str, out_dir: str, dtype) -> None:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        shutil.copyfile(os.path.join(model_dir, "generation_config.json"),
                        os.path.join(out_dir, "generation_config.json"))
    _tokenizer(model_dir, adapter_dir).save_pretrained(out_dir)


@torch.no_grad()
def sample(model_dir: str, adapter_dir: str, prompt: str, max_new_tokens: int = 40, dtype=torch.bfloat16) -> str:
    """Greedy continuation of `prompt` by base + adapter (deterministic, so it is testable)."""
    model, tokenizer = load_base_with_adapter(model_dir, adapter_dir, dtype)
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class ChatTemplateMissing(ValueError):
    """The tokenizer has no chat template to render a conversation with; one line says where to get one."""


@torch.no_grad()
def chat(model_dir: str, adapter_dir: str | None, message: str, system: str | None = None,
         max_new_tokens: int = 40, dtype=torch.bfloat16) -> tuple[str, str]:
    """(the prompt as the template renders it, the greedy reply) for one user message, by base + adapter, or by
    the base alone when `adapter_dir` is None. The reply ends at the model's own stop tokens
    (generation_config.json: GLM stops at EOS, `<|user|>` and `<|observation|>`), which are not shown."""
    from transformers import AutoTokenizer

    if adapter_dir is None:
        model, tokenizer = load_plain_model(model_dir, dtype), AutoTokenizer.from_pretrained(model_dir)
    else:
        model, tokenizer = load_base_with_adapter(model_dir, adapter_dir, dtype)
    if not tokenizer.chat_template:
        raise ChatTemplateMissing(f"{model_dir} has no chat template (chat_template.jinja, or chat_template in "
                                  f"tokenizer_config.json); download the model's tokenizer files again, or use --sample")
    model.eval()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    if output and output[-1] in stops:
        output = output[:-1]
    return prompt, tokenizer.decode(output, skip_special_tokens=False)
