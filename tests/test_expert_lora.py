"""LoRA on the fused 4-bit routed experts: training, resume, 2 processes, target checks, the streaming merge."""

import json
import os
import signal

import pytest
import torch
from conftest import EXPERT_LORA_SETTINGS as SETTINGS
from conftest import EXPERT_R, EXPERTS, run_cli, shared_folder
from safetensors import safe_open
from safetensors.torch import load_file

from glmkit.run.logs import latest_per_step, read_jsonl

# The tiny model: 2 MoE layers of 8 experts, hidden 128, moe_intermediate 64; attention r 8, experts r 4.
TINY_EXPERT_LORA = 2 * 8 * EXPERT_R * ((128 + 2 * 64) + (64 + 128))
DETERMINISTIC = {"training_log.jsonl": ("loss", "lr", "grad_norm", "tokens"),
                 "eval_log.jsonl": ("val_loss", "val_tokens"),
                 "expert_usage_log.jsonl": ("interval_tokens", "layers")}
TWO_PROCESSES = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]


def curves(out_dir) -> dict:
    found = {}
    for name, fields in DETERMINISTIC.items():
        records = latest_per_step(read_jsonl(os.path.join(out_dir, "logs", name)))
        found[name] = {r["step"]: tuple(r[f] for f in fields) for r in records}
    return found


def expert_weights(adapter_dir) -> dict:
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return {k: v for k, v in weights.items() if ".mlp.experts." in k}


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------
# The forward and the adapter format, in process
# ---------------------------------------------------------------------------

def _kit_model(make_config, overrides):
    from glmkit.config.load import load_config
    from glmkit.model.load import load_model, prepare_for_training

    cfg = load_config(make_config({"lora.dropout": 0.0, "lora.target_modules": ["q_proj"],
                                   "lora.target_parameters": EXPERTS, **overrides}))
    return prepare_for_training(load_model(cfg), cfg)


def _plain_peft(tiny_model_dir, r, alpha):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"],
                                           target_parameters=EXPERTS, init_lora_weights=False))


def test_factored_forward_equals_peft_on_a_plain_model(make_config, tiny_model_dir):
    """Unquantized base, random non-zero LoRA: the kit's grouped_mm forward == peft's ParamWrapper forward."""
    plain = _plain_peft(tiny_model_dir, r=8, alpha=16)
    kit = _kit_model(make_config, {"quantization.load_in_4bit": False, "quantization.quantize_experts": False})
    kit.load_state_dict({k: v for k, v in plain.state_dict().items() if "lora_" in k}, strict=False)
    assert type(kit.base_model.model.model.layers[1].mlp.experts).__name__ == "ExpertLora"
    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = kit.eval()(ids).logits, plain.eval()(ids).logits
        with kit.disable_adapter():
            base = kit(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the expert LoRA does something
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def test_4bit_expert_adapter_has_plain_peft_names_and_shapes(make_config, tiny_model_dir):
    """peft nests a parametrized module's wrappers in another order; the kit's adapter must match a plain model's."""
    kit = _kit_model(make_config, {"lora.r": 8, "lora.expert_r": EXPERT_R, "lora.expert_alpha": 8})
    experts = kit.base_model.model.model.layers[1].mlp.experts
    assert experts.base_layer.base_layer.parametrizations["gate_up_proj"].original.dtype == torch.uint8  # still NF4
    plain = _plain_peft(tiny_model_dir, r=8, alpha=16)
    ours = {k: tuple(v.shape) for k, v in kit.state_dict().items() if "lora_" in k and "q_proj" not in k}
    theirs = {k: tuple(v.shape) for k, v in plain.state_dict().items() if "lora_" in k and "q_proj" not in k}
    assert list(ours) == list(theirs)
    # rank 4 for the experts: lora_A of gate_up is [E * r, hidden]
    assert ours["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.default.weight"] == (8 * EXPERT_R, 128)


# ---------------------------------------------------------------------------
# Training: trainable count, weights move, eval, retention, best adapter
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_training_counts_and_moves_the_expert_weights(expert_run):
    start = read_jsonl(os.path.join(expert_run["out"], "logs", "events_log.jsonl"))[0]
    by_group = start["model_audit"]["trainable_params_by_group"]
    assert by_group["routed_experts"] == TINY_EXPERT_LORA
    assert by_group["attention"] == 3 * 8 * ((128 + 128) + (128 + 64) + (128 + 64) + (128 + 128))
    assert start["model_audit"]["trainable_params"] == sum(by_group.values())
    assert start["model_audit"]["unquantized_expert_params"] == 0  # the experts stayed 4-bit
    assert f"routed experts {TINY_EXPERT_LORA:,}" in expert_run["stdout"]
    final = expert_weights(os.path.join(expert_run["out"], "final-checkpoint-8"))
    assert len(final) == 8  # 2 layers x (gate_up, down) x (A, B)
    assert all(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # B starts at zero: it trained
    losses = [r["loss"] for r in read_jsonl(os.path.join(expert_run["out"], "logs", "training_log.jsonl"))]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))


@pytest.mark.trains
def test_eval_retention_and_best_adapter_carry_the_experts(expert_run):
    evals = read_jsonl(os.path.join(expert_run["out"], "logs", "eval_log.jsonl"))
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8]
    remaining = sorted(n for n in os.listdir(expert_run["out"]) if "checkpoint" in n)
    assert "final-checkpoint-8" in remaining and len(remaining) <= 3
    best = json.load(open(os.path.join(expert_run["best"], "best.json")))
    assert best["val_loss"] == min(e["val_loss"] for e in evals if e["step"] > 0)
    assert len(expert_weights(expert_run["best"])) == 8


@pytest.mark.trains
def test_best_adapter_loads_with_plain_peft(expert_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, expert_run["best"])
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".mlp.experts." in k and "lora_" in k}
    saved = expert_weights(expert_run["best"])
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)


# ---------------------------------------------------------------------------
# Exact resume and two processes
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_sigkill_then_resume_is_bit_identical(expert_run, make_config, tmp_path):
    config = make_config(SETTINGS)
    killed = run_cli(["train_qlora.py", "--config", config], env={"GLMKIT_FAULT_KILL_AT": "mid_step:6"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference, ours = curves(expert_run["out"]), curves(str(tmp_path / "run"))
    assert reference == ours
    a = expert_weights(os.path.join(expert_run["out"], "final-checkpoint-8"))
    b = expert_weights(str(tmp_path / "run" / "final-checkpoint-8"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.trains
def test_two_processes_train_the_experts(make_config, tmp_path):
    config = make_config({**SETTINGS, "training.max_steps": 4, "checkpoint.interval": 4})
    result = run_cli([*TWO_PROCESSES, "train_qlora.py", "--config", config], env={"ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    start = read_jsonl(str(tmp_path / "run" / "logs" / "events_log.jsonl"))[0]
    assert start["world_size"] == 2 and start["model_audit"]["trainable_params_by_group"]["routed_experts"] == TINY_EXPERT_LORA
    assert [r["step"] for r in read_jsonl(str(tmp_path / "run" / "logs" / "training_log.jsonl"))] == [1, 2, 3, 4]
    final = expert_weights(str(tmp_path / "run" / "final-checkpoint-4"))
    assert all(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)


# ---------------------------------------------------------------------------
# Targets that match nothing, and options expert LoRA cannot take: one line, exit 2, before loading
# ---------------------------------------------------------------------------

@pytest.mark.trains
@pytest.mark.parametrize("overrides, message", [
    ({"lora.target_modules": ["q_proj", "nonexistent_proj"]},
     "lora.target_modules: 'nonexistent_proj' matches no Linear layer of the model; it has down_proj, gate_proj, "
     "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ({"lora.dropout": 0.0, "lora.target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.gate_proj"]},
     "lora.target_parameters: 'mlp.experts.gate_proj' matches no fused routed-expert parameter of the model; it has "
     "mlp.experts.down_proj, mlp.experts.gate_up_proj"),
])
def test_a_target_that_matches_nothing_is_refused_before_loading(make_config, tmp_path, overrides, message):
    line = one_line_error(run_cli(["train_qlora.py", "--config", make_config(overrides)]))
    assert line == f"error: {message}"
    assert not os.path.exists(tmp_path / "scratch" / "tokenized")  # refused before the data and the weights


@pytest.mark.trains
def test_dropout_with_expert_lora_is_a_config_error(make_config):
    line = one_line_error(run_cli(["train_qlora.py", "--config", make_config({"lora.target_parameters": EXPERTS})]))
    assert line.startswith("config error: lora.dropout: must be 0 when lora.target_parameters is set")


# ---------------------------------------------------------------------------
# The streaming merge
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def merged(tmp_path_factory, expert_run):
    def merge(folder):
        result = run_cli(["use_adapter.py", "--config", expert_run["config"], "--merge", str(folder / "merged"),
                          "--dtype", "float32"])
        assert result.returncode == 0, result.stderr[-2000:]

    return str(shared_folder(tmp_path_factory, "expert-merged", merge) / "merged")


@pytest.mark.trains
def test_merged_logits_equal_base_plus_adapter(expert_run, merged, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          expert_run["best"]).eval()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
        with reference.disable_adapter():
            base = reference(ids).logits
    assert (theirs - base).abs().max() > 1e-3  # the adapter changes the output
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.trains
def test_merged_checkpoint_has_the_hub_layout(merged, tiny_model_dir):
    base_index = json.load(open(os.path.join(tiny_model_dir, "model.safetensors.index.json")))["weight_map"]
    index = json.load(open(os.path.join(merged, "model.safetensors.index.json")))
    assert index["weight_map"] == base_index  # same keys, same shards: per-expert, as on the Hub
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in index["weight_map"]
    for shard in set(index["weight_map"].values()):
        with safe_open(os.path.join(merged, shard), framework="pt") as fh:
            assert set(fh.keys()) == {k for k, v in base_index.items() if v == shard}
    assert index["metadata"]["total_size"] == sum(
        os.path.getsize(os.path.join(merged, s)) for s in set(index["weight_map"].values())) - sum(
        8 + int.from_bytes(open(os.path.join(merged, s), "rb").read(8), "little") for s in set(index["weight_map"].values()))
    assert json.load(open(os.path.join(merged, "config.json")))["dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(merged))
    assert not any(name.startswith("adapter") for name in os.listdir(merged))


@pytest.mark.trains
def test_merged_expert_tensors_differ_from_the_base(merged, tiny_model_dir):
    def tensor(folder, key):
        shard = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"][key]
        with safe_open(os.path.join(folder, shard), framework="pt") as fh:
            return fh.get_tensor(key).float()

    for key in ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.2.mlp.experts.0.up_proj.weight",
                "model.layers.2.mlp.experts.5.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert (tensor(merged, key) - tensor(tiny_model_dir, key)).abs().max() > 0, key
    for key in ("model.layers.1.mlp.shared_experts.up_proj.weight", "model.embed_tokens.weight"):  # not adapted
        assert torch.equal(tensor(merged, key), tensor(tiny_model_dir, key)), key


@pytest.mark.trains
def test_sample_works_with_expert_lora(expert_run):
    result = run_cli(["use_adapter.py", "--config", expert_run["config"], "--sample", "The module",
                      "--max-new-tokens", "6", "--dtype", "float32"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.trains
def test_merge_refuses_a_folder_that_holds_a_model(expert_run, merged):
    line = one_line_error(run_cli(["use_adapter.py", "--config", expert_run["config"], "--merge", merged]))
    assert line.startswith(f"error: --merge {merged} already holds a model (")


@pytest.mark.trains
def test_merge_refuses_a_model_that_does_not_fit_the_adapter(expert_run, tiny_model_dir, tmp_path):
    """Same architecture, other expert width; then another architecture altogether."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.moe_intermediate_size = 32
    config.num_nextn_predict_layers = 0  # transformers saves no MTP layer: the config must not announce one
    other = tmp_path / "narrow-experts"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    line = one_line_error(run_cli(["use_adapter.py", "--config", expert_run["config"], "--set",
                                   f"paths.model_dir={other}", "--merge", str(tmp_path / "out")]))
    assert line.startswith(f"error: the adapter does not fit {other}: model.layers.1.mlp.experts.down_proj is "
                           f"[8, 128, 32] there")
    assert not os.path.exists(tmp_path / "out")
    # --sample refuses the same mismatch in the same line (it used to be a peft size-mismatch traceback).
    sampled = one_line_error(run_cli(["use_adapter.py", "--config", expert_run["config"], "--set",
                                      f"paths.model_dir={other}", "--sample", "The module"]))
    assert sampled == line
    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=128).save_pretrained(llama)
    line = one_line_error(run_cli(["use_adapter.py", "--config", expert_run["config"], "--set",
                                   f"paths.model_dir={llama}", "--merge", str(tmp_path / "out")]))
    assert "holds a 'llama' model" in line


@pytest.mark.trains
def test_merge_refuses_adapter_options_it_cannot_fold(expert_run, tiny_model_dir, tmp_path):
    import shutil

    from glmkit.model.adapter import MergeError, merge

    adapter = tmp_path / "dora"
    shutil.copytree(expert_run["best"], adapter)
    os.remove(adapter / "best.json")  # an adapter from another tool: no manifest of the kit's to check
    config = json.load(open(adapter / "adapter_config.json"))
    json.dump({**config, "use_dora": True}, open(adapter / "adapter_config.json", "w"))
    with pytest.raises(MergeError, match=r"uses DoRA, which the merge cannot fold into plain weights"):
        merge(tiny_model_dir, str(adapter), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------
# The plan prices what the trainer builds
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_plan_prices_the_expert_lora_the_trainer_builds(make_config, expert_run):
    from glmkit.config.load import load_config
    from glmkit.plan.fit import build_plan

    plan = build_plan(load_config(expert_run["config"]), gpu_memory_bytes=int(141e9), num_processes=1)
    start = read_jsonl(os.path.join(expert_run["out"], "logs", "events_log.jsonl"))[0]
    assert plan["lora_params_by_group"] == start["model_audit"]["trainable_params_by_group"]
    assert plan["lora_params"] == start["model_audit"]["trainable_params"]
    assert plan["expert_lora_rank"] == EXPERT_R and plan["expert_lora_transient_bytes"] > 0
    without = build_plan(load_config(make_config({"lora.dropout": 0.0})), gpu_memory_bytes=int(141e9),
                         num_processes=1)
    assert without["expert_lora_transient_bytes"] == 0 and without["lora_params_by_group"]["routed_experts"] == 0
    assert plan["activation_bytes"] > without["activation_bytes"]


def test_plan_for_glm45_air_expert_lora(tmp_path):
    """45 MoE layers x 128 experts x r x (2 hidden + 3 moe_intermediate), in fp32 with grads and both moments."""
    from glmkit.config.load import load_config
    from glmkit.plan.fit import build_plan, format_plan

    path = tmp_path / "air.yaml"
    path.write_text(f"paths:\n  model_dir: {tmp_path / 'none'}\nlora:\n  dropout: 0\n  expert_r: 8\n"
                    f"  target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]\n")
    plan = build_plan(load_config(str(path)), gpu_memory_bytes=int(141e9), num_processes=4)
    experts = 45 * 128 * 8 * (2 * 4096 + 3 * 1408)
    assert plan["lora_params_by_group"]["routed_experts"] == experts == 572_129_280
    assert plan["per_gpu"]["optimizer"] == 8 * plan["lora_params"] and plan["fits"]
    assert "of which routed experts (rank 8)" in format_plan(plan)
