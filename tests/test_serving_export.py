"""use_adapter.py --export-serving: the trained adapter in the per-expert layout vLLM and SGLang load, checked
independently.

The check is a reference that shares nothing with the kit's training or merge code: it reads the Hub-layout base
checkpoint (per-expert weights, by name) and the exported adapter (per-expert LoRA, by name), and applies the LoRA
unmerged, as a server does, y = W x + scale * B (A x), with a plain per-expert loop in torch. transformers runs
the rest of the model (embeddings, attention, router). Its logits must equal the merged model's and those of
base + the trained peft adapter (peft's own fused ParamWrapper maths) to 1e-4 in fp32, and a layout mistake (gate
and up swapped) must not.
"""

import json
import os
import re
import shutil

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PER_EXPERT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\."
                            r"(gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---------------------------------------------------------------------------
# The independent reference: Hub-layout base weights + per-expert LoRA, unmerged
# ---------------------------------------------------------------------------

def hub_tensor(model_dir: str, key: str) -> torch.Tensor:
    index = json.load(open(os.path.join(model_dir, "model.safetensors.index.json")))["weight_map"]
    with safe_open(os.path.join(model_dir, index[key]), framework="pt") as fh:
        return fh.get_tensor(key).float()


class PerExpertReference(torch.nn.Module):
    """One MoE layer's routed experts from per-expert Hub weights, with per-expert LoRA added unmerged."""

    def __init__(self, model_dir: str, layer: int, num_experts: int, lora: dict, scale: float):
        super().__init__()
        self.weights, self.lora, self.scale = [], [], scale
        for e in range(num_experts):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            self.weights.append({p: hub_tensor(model_dir, f"{prefix}.{p}.weight") for p in ("gate_proj", "up_proj",
                                                                                              "down_proj")})
            self.lora.append({p: lora[f"{prefix}.{p}"] for p in ("gate_proj", "up_proj", "down_proj")
                              if f"{prefix}.{p}" in lora})

    def project(self, x, e: int, proj: str) -> torch.Tensor:
        y = x @ self.weights[e][proj].T
        if proj in self.lora[e]:
            a, b = self.lora[e][proj]
            y = y + self.scale * ((x @ a.T) @ b.T)
        return y

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(len(self.weights)):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            h = torch.nn.functional.silu(self.project(x, e, "gate_proj")) * self.project(x, e, "up_proj")
            out.index_add_(0, token, self.project(h, e, "down_proj") * top_k_weights[token, slot, None])
        return out


def reference_model(model_dir: str, served_dir: str):
    """transformers' base model with the served adapter applied as a server applies it, never merged."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = json.load(open(os.path.join(served_dir, "adapter_config.json")))
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(os.path.join(served_dir, "adapter_model.safetensors"))
    lora = {}
    for key, value in tensors.items():
        module, _, factor = key.removeprefix("base_model.model.").rpartition(".lora_")
        lora.setdefault(module, {})[factor] = value.float()
    lora = {module: (f["A.weight"], f["B.weight"]) for module, f in lora.items()}
    for name, module in model.named_modules():
        if name in lora and isinstance(module, torch.nn.Linear):
            a, b = lora[name]
            module.register_forward_hook(lambda m, args, out, a=a, b=b: out + scale * ((args[0] @ a.T) @ b.T))
    for layer, block in enumerate(model.model.layers):
        if hasattr(block.mlp, "experts"):
            block.mlp.experts = PerExpertReference(model_dir, layer, model.config.n_routed_experts, lora, scale)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------
# One export of the shared expert-LoRA run, and what it is compared with
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(expert_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "served"
    result = run_cli(["use_adapter.py", "--config", expert_run["config"], "--export-serving", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"exported {expert_run['best']} for serving: {out}" in result.stdout
    return str(out)


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def peft_logits(expert_run, tiny_model_dir, inputs):
    """(base + trained adapter, base alone) by plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      expert_run["best"]).eval()
    with_adapter = logits(model, inputs)
    with model.disable_adapter():
        base = logits(model, inputs)
    return with_adapter, base


@pytest.mark.trains
def test_export_has_the_per_expert_layout(served, tiny_model_dir):
    config = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    moe_layers = range(config["first_k_dense_replace"], config["num_hidden_layers"])
    shapes = {"gate_proj": (config["hidden_size"], config["moe_intermediate_size"]),
              "up_proj": (config["hidden_size"], config["moe_intermediate_size"]),
              "down_proj": (config["moe_intermediate_size"], config["hidden_size"])}  # (in, out)
    with safe_open(os.path.join(served, "adapter_model.safetensors"), framework="pt") as fh:
        found = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    expert_keys = {k: v for k, v in found.items() if ".mlp.experts." in k}
    want = {f"base_model.model.model.layers.{n}.mlp.experts.{e}.{p}.lora_{f}.weight"
            for n in moe_layers for e in range(config["n_routed_experts"]) for p in shapes for f in "AB"}
    assert set(expert_keys) == want  # every expert of every MoE layer, all three projections (vLLM stacks them)
    rank = 8  # max(lora.r 8, lora.expert_r 4): the expert factors are zero-padded to it
    for key, shape in expert_keys.items():
        _, _, proj, factor = PER_EXPERT_KEY.match(key).groups()
        in_features, out_features = shapes[proj]
        assert shape == ((rank, in_features) if factor == "A" else (out_features, rank)), key
    attention = {k for k in found if ".self_attn." in k}
    assert attention == {f"base_model.model.model.layers.{n}.self_attn.{p}.lora_{f}.weight"
                         for n in range(config["num_hidden_layers"]) for p in ATTENTION for f in "AB"}
    assert set(found) == set(expert_keys) | attention and not any("base_layer" in k for k in found)

    adapter_config = json.load(open(os.path.join(served, "adapter_config.json")))
    assert adapter_config["r"] == adapter_config["lora_alpha"] == rank  # each module's scale is folded into B
    assert not adapter_config["rank_pattern"] and not adapter_config["alpha_pattern"]
    assert adapter_config["target_parameters"] is None and not adapter_config["use_rslora"]
    assert "model.layers.2.mlp.experts.7.down_proj" in adapter_config["target_modules"]
    assert "model.layers.0.self_attn.q_proj" in adapter_config["target_modules"]
    assert len(adapter_config["target_modules"]) == len(found) // 2
    readme = open(os.path.join(served, "README.md")).read()
    assert "vllm serve" in readme and "sglang.launch_server" in readme and "--max-lora-rank 8" in readme


@pytest.mark.trains
def test_reference_equals_merged_and_peft(served, expert_run, tiny_model_dir, peft_logits, inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from glmkit.model.adapter import merge

    with_adapter, base = peft_logits
    assert (with_adapter - base).abs().max() > 1e-3  # the adapter changes the output
    reference = logits(reference_model(tiny_model_dir, served), inputs)
    merged_dir = merge(tiny_model_dir, expert_run["best"], str(tmp_path / "merged"), torch.float32)
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), inputs)
    assert (reference - with_adapter).abs().max() <= 1e-4
    assert (reference - merged).abs().max() <= 1e-4


@pytest.mark.trains
def test_a_layout_mistake_shows_in_the_logits(served, tiny_model_dir, peft_logits, inputs, tmp_path):
    """gate and up swapped, as a wrong split would write them: the reference must see it."""
    wrong = tmp_path / "swapped"
    shutil.copytree(served, wrong)
    tensors = load_file(str(wrong / "adapter_model.safetensors"))
    swapped = {}
    for key, value in tensors.items():
        other = key.replace("gate_proj", "up_proj") if "gate_proj" in key else key.replace("up_proj", "gate_proj")
        swapped[other if ".mlp.experts." in key else key] = value
    save_file(swapped, str(wrong / "adapter_model.safetensors"))
    with_adapter, _ = peft_logits
    assert (logits(reference_model(tiny_model_dir, str(wrong)), inputs) - with_adapter).abs().max() > 1e-3


def _adapter_variant(source: str, folder, keep, config_changes: dict, rename=lambda key: key) -> str:
    """A copy of a peft adapter with only the tensors `keep` accepts (renamed) and its config changed."""
    os.makedirs(folder)
    tensors = load_file(os.path.join(source, "adapter_model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items() if keep(k)}, os.path.join(folder, "adapter_model.safetensors"))
    config = json.load(open(os.path.join(source, "adapter_config.json")))
    json.dump({**config, **config_changes}, open(os.path.join(folder, "adapter_config.json"), "w"))
    return str(folder)


def _peft(tiny_model_dir, adapter_dir, inputs) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return logits(PeftModel.from_pretrained(base, adapter_dir).eval(), inputs)


@pytest.mark.trains
def test_attention_only_export_is_the_plain_peft_adapter(expert_run, tiny_model_dir, inputs, tmp_path):
    from glmkit.model.serving_export import export_for_serving

    adapter = _adapter_variant(expert_run["best"], tmp_path / "attention", lambda k: ".mlp.experts." not in k,
                               {"target_parameters": None, "rank_pattern": {}, "alpha_pattern": {}})
    summary = export_for_serving(tiny_model_dir, adapter, str(tmp_path / "served"))
    assert summary["layout"].startswith("plain peft adapter") and summary["rank"] == 8
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert open(tmp_path / "served" / name, "rb").read() == open(os.path.join(adapter, name), "rb").read()
    reference = logits(reference_model(tiny_model_dir, str(tmp_path / "served")), inputs)
    assert (reference - _peft(tiny_model_dir, adapter, inputs)).abs().max() <= 1e-4


@pytest.mark.trains
def test_experts_with_gate_up_only_get_zero_down_factors(expert_run, tiny_model_dir, inputs, tmp_path):
    """peft nests a layer's wrappers by what is adapted: alone, gate_up_proj's factors lose their `base_layer.`."""
    from glmkit.model.serving_export import export_for_serving

    source = json.load(open(os.path.join(expert_run["best"], "adapter_config.json")))
    adapter = _adapter_variant(
        expert_run["best"], tmp_path / "gate-up",
        keep=lambda k: ".mlp.experts.lora_" not in k,  # drop down_proj's factors (the outer wrapper)
        config_changes={"target_parameters": [p for p in source["target_parameters"] if p.endswith("gate_up_proj")],
                        "rank_pattern": {k: v for k, v in source["rank_pattern"].items() if "gate_up" in k},
                        "alpha_pattern": {k: v for k, v in source["alpha_pattern"].items() if "gate_up" in k}},
        rename=lambda k: k.replace(".mlp.experts.base_layer.lora_", ".mlp.experts.lora_"))
    export_for_serving(tiny_model_dir, adapter, str(tmp_path / "served"))
    tensors = load_file(str(tmp_path / "served" / "adapter_model.safetensors"))
    down = [v for k, v in tensors.items() if ".down_proj." in k and ".mlp.experts." in k]
    assert len(down) == 2 * 8 * 2 and all(not v.any() for v in down)
    assert all(v.any() for k, v in tensors.items() if ".gate_proj.lora_B" in k)
    reference = logits(reference_model(tiny_model_dir, str(tmp_path / "served")), inputs)
    assert (reference - _peft(tiny_model_dir, adapter, inputs)).abs().max() <= 1e-4


# ---------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_refuses_an_adapter_it_cannot_express(expert_run, tmp_path):
    adapter = tmp_path / "dora"
    shutil.copytree(expert_run["best"], adapter)
    os.remove(adapter / "best.json")  # an adapter from another tool: no manifest of the kit's to check
    config = json.load(open(adapter / "adapter_config.json"))
    json.dump({**config, "use_dora": True}, open(adapter / "adapter_config.json", "w"))
    result = run_cli(["use_adapter.py", "--config", expert_run["config"], "--adapter", str(adapter),
                      "--export-serving", str(tmp_path / "out")])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {adapter} uses DoRA, which per-expert LoRA keys cannot express (vLLM and SGLang serve plain LoRA: "
        f"scale * B @ A on a weight)")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / ".out.export-partial")


@pytest.mark.trains
def test_refuses_other_fused_parameters_and_a_folder_in_use(expert_run, tiny_model_dir, tmp_path):
    from glmkit.model.serving_export import ServingExportError, export_for_serving

    adapter = _adapter_variant(expert_run["best"], tmp_path / "odd", lambda k: True,
                               {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.router_bias"]})
    with pytest.raises(ServingExportError, match=r"adapts the parameter mlp\.experts\.router_bias; the serving "
                                                 r"layout has per-expert keys for experts\.gate_up_proj and "
                                                 r"experts\.down_proj only"):
        export_for_serving(tiny_model_dir, adapter, str(tmp_path / "out"))
    unlisted = _adapter_variant(expert_run["best"], tmp_path / "unlisted", lambda k: True,
                                {"target_parameters": None, "rank_pattern": {}, "alpha_pattern": {}})
    with pytest.raises(ServingExportError, match=r"does not list it in target_parameters"):  # never copied as is
        export_for_serving(tiny_model_dir, unlisted, str(tmp_path / "out"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ServingExportError, match=r"is not empty; choose a new or empty folder"):
        export_for_serving(tiny_model_dir, expert_run["best"], str(busy))
    assert os.listdir(busy) == ["notes.txt"] and not os.path.exists(tmp_path / "out")


def test_vllm_max_lora_rank_is_one_vllm_accepts():
    from glmkit.model.serving_export import ServingExportError, vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 12, 16, 300, 512)] == [1, 8, 8, 16, 16, 320, 512]
    with pytest.raises(ServingExportError, match=r"rank 600 is above vLLM's largest --max-lora-rank \(512\)"):
        vllm_max_lora_rank(600)


# ---------------------------------------------------------------------------
# The shipped LoRA settings: lora.expert_r null (= r), so gate and up share one A and nothing is padded
# ---------------------------------------------------------------------------

def test_export_with_the_shipped_lora_settings_equals_peft_deltas(make_config, tiny_model_dir, tmp_path):
    """training_config.yaml's lora section with the experts turned on (dropout 0, as they require): expert_r and
    expert_alpha null. Every exported per-expert and attention factor pair must give peft's own delta."""
    import yaml
    from conftest import EXPERTS, ROOT
    from transformers import AutoModelForCausalLM

    from glmkit.config.load import load_config
    from glmkit.model.lora import apply_lora

    shipped = yaml.safe_load(open(os.path.join(ROOT, "training_config.yaml"), encoding="utf-8"))["lora"]
    assert shipped["expert_r"] is None and shipped["expert_alpha"] is None
    config = make_config({**{f"lora.{k}": v for k, v in shipped.items()}, "lora.dropout": 0.0,
                          "lora.target_parameters": EXPERTS})
    cfg = load_config(config)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), cfg.lora)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give every factor a value, so a wrong pairing shows
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter = str(tmp_path / "adapter")
    model.save_pretrained(adapter)

    out = tmp_path / "served"
    result = run_cli(["use_adapter.py", "--config", config, "--adapter", adapter, "--export-serving", str(out)])
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    served_config = json.load(open(out / "adapter_config.json"))
    assert served_config["r"] == served_config["lora_alpha"] == shipped["r"]  # scale 1: alpha / r folded into B
    tensors = load_file(str(out / "adapter_model.safetensors"))

    def exported(module: str) -> torch.Tensor:
        prefix = f"base_model.model.{module}"
        return tensors[f"{prefix}.lora_B.weight"].float() @ tensors[f"{prefix}.lora_A.weight"].float()

    layers = model.base_model.model.model.layers
    compared = 0
    for n, layer in enumerate(layers):
        for proj in ATTENTION:
            peft_delta = getattr(layer.self_attn, proj).get_delta_weight("default")
            assert torch.allclose(exported(f"model.layers.{n}.self_attn.{proj}"), peft_delta, atol=1e-6)
            compared += 1
        if not hasattr(layer.mlp, "experts"):
            continue
        down, gate_up = layer.mlp.experts, layer.mlp.experts.base_layer  # peft nests gate_up_proj innermost
        gate_up_delta = gate_up.get_delta_weight("default")  # [E, 2I, H] like the fused parameter
        down_delta = down.get_delta_weight("default")        # [E, H, I]
        half = gate_up_delta.shape[1] // 2
        for e in range(gate_up_delta.shape[0]):
            prefix = f"model.layers.{n}.mlp.experts.{e}"
            assert torch.allclose(exported(f"{prefix}.gate_proj"), gate_up_delta[e, :half], atol=1e-6)
            assert torch.allclose(exported(f"{prefix}.up_proj"), gate_up_delta[e, half:], atol=1e-6)
            assert torch.allclose(exported(f"{prefix}.down_proj"), down_delta[e], atol=1e-6)
            compared += 3
    assert compared == 3 * 4 + 2 * 8 * 3
