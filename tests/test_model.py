"""The tiny checkpoint, the streaming 4-bit loader and its audit."""

import hashlib
import json
import os

import torch
from conftest import write_tiny_model_in_fresh_process

from glmkit.config.load import load_config
from glmkit.model.load import audit_model, check_audit, load_model, prepare_for_training


def test_tiny_checkpoint_has_the_real_layout(tiny_model_dir):
    config = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    assert config["architectures"] == ["Glm4MoeForCausalLM"]
    assert config["first_k_dense_replace"] == 1 and config["n_shared_experts"] == 1
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5 and config["hidden_size"] <= 256
    index = json.load(open(os.path.join(tiny_model_dir, "model.safetensors.index.json")))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(os.path.getsize(os.path.join(tiny_model_dir, s)) > 0 for s in shards)
    # per-expert tensors, as on the Hub: the loader must fuse them
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in index["weight_map"]
    assert os.path.isfile(os.path.join(tiny_model_dir, "tokenizer.json"))
    # the MTP layer after the 3 decoder layers, GLM-4.5-Air's way: its own parts, a MoE decoder layer (experts per
    # expert), and copies of the embedding and lm_head
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 3
    mtp = {k.removeprefix("model.layers.3.") for k in index["weight_map"] if k.startswith("model.layers.3.")}
    assert {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "embed_tokens.weight",
            "shared_head.head.weight", "self_attn.q_proj.weight", "mlp.gate.e_score_correction_bias",
            "mlp.shared_experts.down_proj.weight", "mlp.experts.7.down_proj.weight"} <= mtp
    assert not any(k.startswith("model.layers.4.") for k in index["weight_map"])


def test_same_seed_same_files(tiny_model_dir, tmp_path):
    write_tiny_model_in_fresh_process(str(tmp_path / "again"), env={"PYTHONHASHSEED": "4321"})
    for name in sorted(os.listdir(tiny_model_dir)):
        a = hashlib.sha256(open(os.path.join(tiny_model_dir, name), "rb").read()).hexdigest()
        b = hashlib.sha256(open(tmp_path / "again" / name, "rb").read()).hexdigest()
        assert a == b, name


def test_loader_without_quantization_equals_from_pretrained(make_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = load_config(make_config({"quantization.load_in_4bit": False, "quantization.quantize_experts": False}))
    ours = load_model(cfg).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 2048, (2, 32))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


def test_audit_shows_every_expert_and_linear_in_4bit(make_config):
    cfg = load_config(make_config())
    model = load_model(cfg)
    audit = audit_model(model)
    check_audit(audit, cfg)
    groups = audit["groups"]
    assert audit["unquantized_expert_params"] == 0 and audit["unquantized_linear_params"] == 0
    assert groups["routed_experts"]["params"] == groups["routed_experts"]["quantized_params"] == 2 * 8 * 3 * 64 * 128
    for name in ("dense_mlp", "shared_experts"):
        assert groups[name]["params"] == groups[name]["quantized_params"] > 0
    # 4-bit: about half a byte per parameter plus a little quantization state
    assert groups["routed_experts"]["bytes"] < 0.6 * groups["routed_experts"]["params"]
    for name in ("embeddings", "lm_head", "norms", "router"):
        assert groups[name]["quantized_params"] == 0
    # the MTP layer: a MoE layer plus eh_proj [128, 256], every Linear and expert 4-bit (not its router, norms, biases)
    mtp_experts, eh_proj = 8 * 3 * 64 * 128, 128 * 256
    assert groups["mtp"]["quantized_params"] == mtp_experts + eh_proj + 3 * 64 * 128 + 2 * 128 * 128 + 2 * 64 * 128
    assert groups["mtp"]["params"] == groups["mtp"]["quantized_params"] + 8 * 128 + 8 + 5 * 128 + 128 + 2 * 64
    model = prepare_for_training(model, cfg)
    audit = audit_model(model)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert audit["trainable_params"] == lora_params == audit["groups"]["lora"]["params"] > 0
    # nothing large was upcast to fp32 beyond the compute dtype
    assert all(p.dtype != torch.float64 for p in model.parameters())


def test_audit_fails_when_experts_escape_4bit(make_config):
    import pytest

    from glmkit.model.errors import ModelLoadError

    cfg = load_config(make_config({"quantization.quantize_experts": False}))
    audit = audit_model(load_model(cfg))
    assert audit["unquantized_expert_params"] == 3 * 8 * 3 * 64 * 128  # two MoE decoder layers and the MTP layer
    cfg.quantization.quantize_experts = True  # what the run asked for, vs what loaded
    with pytest.raises(ModelLoadError, match="routed-expert parameters are not 4-bit"):
        check_audit(audit, cfg)


def test_loaded_model_keeps_no_checkpoint_file_mapped(make_config, tiny_model_dir, tmp_path):
    """On CPU the shards are memory-mapped while read; the model must own its memory afterwards."""
    import gc
    import shutil

    model_dir = str(tmp_path / "model")  # a copy nothing else in this process has opened
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = load_config(make_config({"paths.model_dir": model_dir, "quantization.compute_dtype": "bfloat16",
                                   "quantization.load_in_4bit": False, "quantization.quantize_experts": False}))
    model = load_model(cfg, "cpu")
    gc.collect()
    with open("/proc/self/maps", encoding="utf-8") as fh:
        mapped = [line.split()[-1] for line in fh if model_dir in line]
    assert mapped == [] and model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_tiny_glm47_variant_loads_4bit_with_qk_norm_and_trains(tmp_path, tiny_model_dir, demo_corpus):
    """download_model.py --tiny glm4.7: GLM-4.7's (= GLM-4.6's) shape (3 dense layers, QK-norm, scaling 2.5), every
    Linear and expert 4-bit after the kit's loader, the MTP layer's too (stored without the embedding and lm_head
    copies, GLM-4.6's layout), the checkpoint's q/k norms in place, LoRA on attention and experts learns."""
    from conftest import run_cli, write_tiny_config

    from glmkit.train.loss import causal_lm_loss_sum

    model_dir = str(tmp_path / "tiny-glm47")
    code = (f"from glmkit.demo.tiny import write_tiny_checkpoint; "
            f"write_tiny_checkpoint({model_dir!r}, seed=0, variant='glm4.7', tokenizer_from={tiny_model_dir!r})")
    assert run_cli(["-c", code]).returncode == 0
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["first_k_dense_replace"] == 3 and config["use_qk_norm"] is True
    assert config["num_hidden_layers"] == 5 and config["routed_scaling_factor"] == 2.5
    cfg = load_config(write_tiny_config(tmp_path, model_dir, demo_corpus, {
        "lora.dropout": 0.0, "lora.target_parameters": ["gate_up_proj", "down_proj"],
        "model.attn_implementation": "sdpa"}))
    model = load_model(cfg)
    audit = audit_model(model)
    check_audit(audit, cfg)
    assert audit["unquantized_expert_params"] == 0 and audit["groups"]["routed_experts"]["quantized_params"] > 0
    assert [type(m.mlp).__name__ for m in model.model.layers] == ["Glm4MoeMLP"] * 3 + ["Glm4MoeMoE"] * 2
    assert type(model.layers[0].mtp_block.mlp).__name__ == "Glm4MoeMoE" and model.layers[0].mtp_block.self_attn.k_norm
    assert audit["groups"]["mtp"]["quantized_params"] > 8 * 3 * 64 * 128
    from safetensors import safe_open

    index = json.load(open(os.path.join(model_dir, "model.safetensors.index.json")))["weight_map"]
    assert "model.layers.5.eh_proj.weight" in index and "model.layers.5.embed_tokens.weight" not in index
    key = "model.layers.4.self_attn.k_norm.weight"
    with safe_open(os.path.join(model_dir, index[key]), framework="pt") as fh:
        assert torch.equal(model.model.layers[4].self_attn.k_norm.weight, fh.get_tensor(key).float())
    model = prepare_for_training(model, cfg)
    assert audit_model(model)["trainable_params_by_group"]["routed_experts"] > 0
    ids = torch.randint(0, config["vocab_size"] - 2, (1, 32))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
             "token_mask": torch.ones_like(ids, dtype=torch.bool)}
    causal_lm_loss_sum(model, batch).backward()
    # lora_B starts at zero, so it is the factor with a gradient on the first step
    expert_b = [p for n, p in model.named_parameters() if ".mlp.experts." in n and "lora_B" in n]
    assert expert_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_b)
