"""GLM-4.7-Flash (transformers' glm4_moe_lite): the kit on the tiny `glm4.7-flash` model and its narrow-v sibling.

The checkpoint's Hub layout and MTP layer; the 4-bit loader and audit; `attention` resolving to the five MLA
projections and a q/k/v/o list refused in one line; varlen attention equal to sdpa with a v head dim below q/k's;
the plan's weights against the audit and its MLA attention activations against what autograd really keeps; the
FLOP count's parameters against the audit; the plan of the real model before any download.

One chain of short runs on two gloo processes (4 steps; the five MLA projections, the routed experts and the MTP
layer trained; text with chat conversations mixed in, a chat eval set) is shared by the training tests:
  ddp2     DDP, the reference
  fsdp2    FSDP                               == ddp2 within 1e-5 relative
  killed   FSDP, SIGKILL in step 3, --resume  == fsdp2 to the bit
then merged (use_adapter.py --merge) against base + peft, and exported for serving (refused: LoRA on kv_b_proj).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import ROOT, model_with_random_adapter, run_cli, write_tiny_config
from safetensors.torch import load_file, save_file

from glmkit.config.load import load_config
from glmkit.run.logs import latest_per_step, read_jsonl

MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MTP_LAYER = 3  # 3 decoder layers: the MTP layer is model.layers.3, as GLM-4.7-Flash's is model.layers.47


# ---------------------------------------------------------------------------
# The checkpoint, the loader, LoRA targets
# ---------------------------------------------------------------------------

def test_tiny_flash_checkpoint_has_the_hub_layout(tiny_flash_dir):
    from glmkit.hub.verify import architecture_of, verify_model_dir

    config = json.load(open(os.path.join(tiny_flash_dir, "config.json")))
    assert config["model_type"] == "glm4_moe_lite" and config["architectures"] == ["Glm4MoeLiteForCausalLM"]
    assert config["qk_nope_head_dim"] + config["qk_rope_head_dim"] == config["v_head_dim"] == 32
    assert config["num_key_value_heads"] == config["num_attention_heads"] and config["num_nextn_predict_layers"] == 1
    index = json.load(open(os.path.join(tiny_flash_dir, "model.safetensors.index.json")))["weight_map"]
    mtp = {k.removeprefix(f"model.layers.{MTP_LAYER}.") for k in index if k.startswith(f"model.layers.{MTP_LAYER}.")}
    # GLM-4.7-Flash's model.layers.47: its own parts, an MLA + MoE block (experts per expert), the trunk copies
    assert {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "embed_tokens.weight",
            "shared_head.head.weight", "self_attn.kv_b_proj.weight", "self_attn.q_a_layernorm.weight",
            "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight"} <= mtp
    assert "model.layers.1.self_attn.q_proj.weight" not in index
    assert verify_model_dir(tiny_flash_dir) == [] and architecture_of(tiny_flash_dir) == "Glm4MoeLiteForCausalLM"


@pytest.fixture(scope="module")
def flash_model(tmp_path_factory, tiny_flash_dir, demo_corpus):
    """The kit's 4-bit tiny GLM-4.7-Flash with LoRA on configs/tiny.yaml's targets (`attention`), loaded once."""
    from glmkit.model.load import audit_model, load_model, prepare_for_training

    cfg = load_config(write_tiny_config(tmp_path_factory.mktemp("flash"), tiny_flash_dir, demo_corpus))
    model = load_model(cfg)
    audit = audit_model(model)
    return cfg, audit, prepare_for_training(model, cfg)


def test_loader_quantizes_everything_and_attention_adapts_the_five_mla_projections(flash_model):
    from glmkit.model.load import check_audit

    cfg, audit, model = flash_model
    check_audit(audit, cfg)
    assert audit["unquantized_expert_params"] == audit["unquantized_linear_params"] == 0
    assert audit["groups"]["attention"]["params"] == audit["groups"]["attention"]["quantized_params"] > 0
    adapted = {name.split(".")[-1] for name, _ in model.named_modules() if name.endswith(MLA)
               and ".self_attn." in name and hasattr(model.get_submodule(name), "lora_A")}
    assert adapted == set(MLA)
    assert sorted(model.peft_config["default"].target_modules) == sorted(MLA)  # a plain adapter_config.json


def test_a_list_written_for_grouped_query_attention_is_refused_in_one_line(tmp_path, tiny_flash_dir, demo_corpus):
    """q/k/v/o on MLA: peft would silently adapt o_proj alone; the kit names what would be adapted, and the fix."""
    from glmkit.model.errors import LoraTargetError
    from glmkit.model.load import check_model_dir

    cfg = load_config(write_tiny_config(tmp_path, tiny_flash_dir, demo_corpus,
                                        {"lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    with pytest.raises(LoraTargetError) as refused:
        check_model_dir(cfg)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        "lora.target_modules [q_proj, k_proj, v_proj, o_proj] would adapt only o_proj of this model's attention, "
        "which is multi-head latent attention (GLM-4.7-Flash: q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, "
        "o_proj): q_proj, k_proj, v_proj match nothing here; set lora.target_modules to [attention]")


# ---------------------------------------------------------------------------
# varlen attention with a v head dim below q/k's
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def narrow_v_models(tmp_path_factory, tiny_flash_narrow_v_dir, demo_corpus):
    """The 4-bit narrow-v model with LoRA on `attention`, once per attention implementation, the same random
    adapter weights in both (random lora_B too, so every LoRA matrix gets a gradient)."""
    return {attn: model_with_random_adapter(tmp_path_factory.mktemp(f"narrow-v-{attn}"), tiny_flash_narrow_v_dir,
                                            demo_corpus, {"model.attn_implementation": attn, "lora.dropout": 0.0})[0]
            for attn in ("sdpa", "varlen")}


def test_varlen_equals_masked_sdpa_with_v_narrower_than_qk(narrow_v_models):
    """A packed batch (a document split over rows, a padded last row): loss and every LoRA gradient, varlen (v padded
    to q/k's head dim and the output cropped) against sdpa with the block mask (v at its own head dim)."""
    from test_attention import loss_and_grads, packed_rows

    from glmkit.data.rows import Collator

    assert narrow_v_models["varlen"].get_base_model().config.v_head_dim == 16
    rows = packed_rows([37, 300, 41, 5, 120, 1, 90])
    results = {attn: loss_and_grads(model, Collator(1, True, "longest", 128, attn)(rows), train=True)
               for attn, model in narrow_v_models.items()}
    (sdpa_loss, sdpa_grads), (varlen_loss, varlen_grads) = results["sdpa"], results["varlen"]
    assert varlen_loss == pytest.approx(sdpa_loss, rel=1e-5)
    assert sdpa_grads.keys() == varlen_grads.keys()
    assert {name.split(".lora_")[0].split(".")[-1] for name in sdpa_grads} == set(MLA)
    for name, want in sdpa_grads.items():
        scale = want.abs().max().item()
        assert scale > 0, name
        assert (varlen_grads[name] - want).abs().max().item() <= 1e-5 * scale, name


# ---------------------------------------------------------------------------
# The plan: weights against the audit, MLA activations against autograd, FLOPs' parameters against the audit
# ---------------------------------------------------------------------------

def test_plan_weights_equal_the_audit_of_the_loaded_model(flash_model):
    from glmkit.model.load import BASE_GROUPS
    from glmkit.plan.fit import build_plan

    cfg, audit, _ = flash_model
    plan = build_plan(cfg, num_processes=1)
    assert plan["source"] == "config.json" and plan["model_type"] == "glm4_moe_lite"
    for name in BASE_GROUPS:
        planned, real = plan["groups"][name], audit["groups"][name]
        assert planned["params"] == real["params"] and planned["quantized_params"] == real["quantized_params"], name
        assert planned["bytes"] == pytest.approx(real["bytes"], rel=0.05), name
    assert plan["weights_bytes"] == pytest.approx(audit["bytes_total"], rel=0.05)
    print(f"tiny glm4.7-flash weights: plan {plan['weights_bytes']:,} B, audit {audit['bytes_total']:,} B")


def saved_for_backward(model, run, shared=()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `run()` runs, the model's own parameters and
    buffers and the `shared` tensors left out: a layer's activation memory, measured (the same count on any machine)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *shared]}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values())


@pytest.mark.parametrize("model_dir", ["tiny_flash_dir", "tiny_model_dir"])
def test_plan_attention_activations_are_within_5_percent_of_what_autograd_keeps(request, tmp_path, demo_corpus,
                                                                                model_dir):
    """One decoder layer's attention with LoRA on every projection, bf16, varlen on a packed row of two documents:
    the bytes it keeps for backward (counted with saved-tensor hooks) against the plan's per-token terms, on MLA
    (glm4.7-flash: q/k at nope + rope, v, the latents' norms) and grouped-query attention (air) alike."""
    from glmkit.model import attention
    from glmkit.model.load import load_model, prepare_for_training
    from glmkit.plan.activations import arch_of, attention_per_token, lora_per_token

    cfg = load_config(write_tiny_config(tmp_path, request.getfixturevalue(model_dir), demo_corpus, {
        "quantization.compute_dtype": "bfloat16", "lora.dropout": 0.0}))
    model = prepare_for_training(load_model(cfg), cfg).train()
    base = model.get_base_model()
    layer, tokens = base.model.layers[1], 256
    hidden = torch.randn(1, tokens, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(torch.bfloat16).requires_grad_()
    positions = torch.cat([torch.arange(100), torch.arange(156)])[None]
    rotary = base.model.rotary_emb(hidden, positions)
    packed = attention.model_kwargs(torch.tensor([0, 100, tokens], dtype=torch.int32), 156)

    def run():
        layer.self_attn(layer.input_layernorm(hidden), position_embeddings=rotary, attention_mask=None,
                        position_ids=positions, **packed)

    # the layer's input (kept by checkpointing) and the rotary tables are counted once for all layers, not here
    measured = saved_for_backward(model, run, shared=(hidden, *rotary))
    a = arch_of(base.config)
    adapted = [m.base_layer.in_features for m in layer.self_attn.modules() if hasattr(m, "lora_A")]
    planned = tokens * (attention_per_token(a, 2) + sum(lora_per_token(n, cfg.lora, 2) for n in adapted))
    print(f"{os.path.basename(cfg.paths.model_dir)}: one layer's attention keeps {measured / tokens:.0f} B a token, "
          f"the plan says {planned / tokens:.0f} ({planned / measured:.4f})")
    assert len(adapted) == (5 if a.mla else 4)
    assert planned == pytest.approx(measured, rel=0.05)


def test_flop_count_multiplies_by_exactly_the_parameters_the_audit_counts(flash_model):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import mfu

    cfg, audit, model = flash_model
    config = model.get_base_model().config
    terms = mfu.active_params(config)["terms"]
    # the trunk's: the MTP layer (the audit's mtp group) drafts at serving time, it is not in a training token's FLOPs
    assert terms["attention"] == audit["groups"]["attention"]["params"] > 0
    assert terms["dense_mlp"] == audit["groups"]["dense_mlp"]["params"]
    assert terms["lm_head"] == audit["groups"]["lm_head"]["params"]
    per_layer, qk, v = mfu.attention_per_layer(config)
    assert (qk, v) == (32, 32) and per_layer * 3 == terms["attention"]
    flops = mfu.flops_per_token(config, 256)
    assert flops["attention_fwd_flops"] == 3 * 4 * (32 + 32) * 256


def test_plan_of_glm47_flash_before_any_download(tmp_path):
    """The Done-when command: the built-in architecture, about 16 GB of NF4 weights (57.6 GB down the plain
    BitsAndBytesConfig path, 114.5 GB after peft's fp32 upcast), MLA's q/k head dim 256 (not the 64 transformers calls
    head_dim), and the shipped recipe's `attention` resolved to the five MLA projections."""
    result = run_cli(["train_qlora.py", "--plan", "--json", "--set", "model.name_or_path=zai-org/GLM-4.7-Flash",
                      "--set", f"paths.model_dir={tmp_path / 'not-downloaded'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["source"] == "builtin" and plan["model"] == "zai-org/GLM-4.7-Flash"
    assert plan["model_type"] == "glm4_moe_lite"
    assert 16e9 < plan["weights_bytes"] < 17e9 and plan["quantized_params"] > 29.9e9
    assert round(plan["plain_path_weights_bytes"] / 1e9, 1) == 57.6
    assert round(plan["plain_path_upcast_weights_bytes"] / 1e9, 1) == 114.5
    # 47 layers of the five MLA projections at r 16: q_a 2048->768, q_b 768->5120, kv_a 2048->576, kv_b 512->8960,
    # o 5120->2048
    assert plan["lora_params"] == 47 * 16 * ((2048 + 768) + (768 + 5120) + (2048 + 576) + (512 + 8960) + (5120 + 2048))
    from glmkit.plan.activations import arch_of, attention_per_token
    from glmkit.plan.weights import GLM47_FLASH_NAME, builtin_config

    a = arch_of(builtin_config(GLM47_FLASH_NAME))
    assert (a.head_dim, a.v_dim, a.kv_heads) == (256, 256, 20)
    # the input norm's fp32 copy, the latents' (768 + 512), q, k, v, output at 20 x 256, the log-sum-exp
    assert attention_per_token(a, 2) == 4 * 2048 + 4 * (768 + 512) + 2 * 20 * 4 * 256 + 4 * 20


def test_the_flash_recipe_fits_one_80gb_gpu():
    from glmkit.plan.fit import build_plan

    cfg = load_config(os.path.join(ROOT, "configs", "glm47_flash.yaml"),
                      [f"paths.model_dir={os.path.join(ROOT, 'no-such-model-dir')}"])
    assert cfg.distributed.num_processes == 1 and cfg.lora.target_modules == ["attention"]
    plan = build_plan(cfg, gpu_memory_bytes=int(80e9))
    assert plan["fits"] and plan["num_processes"] == 1 and not plan["num_processes_assumed"]
    assert cfg.optimization.micro_batch_per_gpu <= plan["max_micro_batch_per_gpu"]


# ---------------------------------------------------------------------------
# Training: DDP, FSDP, SIGKILL and resume, chat data, eval sets, the MTP layer, expert LoRA
# ---------------------------------------------------------------------------

STEPS = 4
# configs/glm47_flash.yaml's LoRA (r 16, alpha 32, attention), with the routed experts (dropout 0 then) and MTP layer
SETTINGS = {"training.max_steps": STEPS, "training.max_seq_length": 256, "training.val_fraction": 0.05,
            "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "lora.target_modules": ["attention"], "mtp.train": True,
            "lora.target_parameters": ["gate_up_proj", "down_proj"], "lora.expert_r": 4, "lora.expert_alpha": 8,
            "logging.eval_interval": 2, "checkpoint.interval": 2, "checkpoint.keep_top_k": 3,
            "logging.expert_stats_interval": 2}
TWO = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no")


def losses(out, field: str = "loss") -> dict[int, float]:
    return {r["step"]: r[field] for r in latest_per_step(read_jsonl(os.path.join(out, "logs", "training_log.jsonl")))}


def evals(out) -> dict[int, dict]:
    return {r["step"]: r for r in latest_per_step(read_jsonl(os.path.join(out, "logs", "eval_log.jsonl")))}


class Chain:
    """The runs, each started the first time a test asks for it, all reading the same data and token cache."""

    def __init__(self, factory, model_dir, corpus):
        from glmkit.demo.chat_corpus import write_chat_corpus

        self.factory, self.model_dir, self.done = factory, model_dir, {}
        data = factory.mktemp("flash-data")
        texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
        write_chat_corpus(str(data / "chat.jsonl"), texts[:120])
        write_chat_corpus(str(data / "chat_eval.jsonl"), texts[120:132], 120)
        self.data = {"paths.data_path": [{"path": corpus, "weight": 1},
                                         {"path": str(data / "chat.jsonl"), "weight": 0.5, "format": "chat"}],
                     "eval.sets": [{"name": "chat", "path": str(data / "chat_eval.jsonl"), "format": "chat"}],
                     "paths.scratch_dir": str(factory.mktemp("flash-scratch"))}

    def run(self, name, strategy, args=(), env=None, ok=True, folder=None):
        if folder is None:
            folder = self.factory.mktemp(name)
            write_tiny_config(folder, self.model_dir, self.data["paths.data_path"][0]["path"], {
                **SETTINGS, **self.data, "distributed.accelerate_config": strategy})
        result = run_cli([*TWO, "train_qlora.py", "--config", str(folder / "config.yaml"), *args], env=env)
        assert (result.returncode == 0) == ok, result.stderr[-3000:]
        return folder

    def get(self, name):
        if name not in self.done:
            self.done[name] = getattr(self, f"_{name}")()
        return self.done[name]

    def _ddp2(self):
        return self.run("ddp2", "ddp")

    def _fsdp2(self):
        return self.run("fsdp2", "fsdp")

    def _killed(self):
        folder = self.run("killed", "fsdp", env={"GLMKIT_FAULT_KILL_AT": "mid_step:3"}, ok=False)
        assert sorted(n for n in os.listdir(folder / "run") if "checkpoint" in n) == ["checkpoint-2"]
        return self.run("killed", "fsdp", args=("--resume",), folder=folder)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_flash_dir, demo_corpus):
    return Chain(tmp_path_factory, tiny_flash_dir, demo_corpus)


@pytest.mark.trains
def test_ddp_trains_the_five_mla_projections_experts_and_mtp_on_text_and_chat(chain):
    out = str(chain.get("ddp2") / "run")
    start = read_jsonl(os.path.join(out, "logs", "events_log.jsonl"))[0]
    assert start["world_size"] == 2 and start["chat"]
    trainable = start["model_audit"]["trainable_params_by_group"]
    assert trainable["attention"] > 0 and trainable["routed_experts"] > 0 and trainable["mtp"] > 0
    train = read_jsonl(os.path.join(out, "logs", "training_log.jsonl"))
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(r["trained_tokens"] < r["tokens"] for r in train)  # chat prompts are seen, not trained
    assert all(r["mtp_loss"] > 0 for r in train)
    record = evals(out)
    assert sorted(record) == [0, 2, 4] and record[0]["sets"] == ["val", "chat"]
    assert all(0 <= r["val/mtp_acceptance"] <= 1 and r["chat/loss"] > 0 for r in record.values())
    # every one of the five MLA projections of every layer moved from its zero start, in the trunk and the MTP layer
    adapter = load_file(os.path.join(out, f"final-checkpoint-{STEPS}", "adapter_model.safetensors"))
    for layer in [f"base_model.model.model.layers.{i}" for i in range(3)] + ["base_model.model.layers.0.mtp_block"]:
        for projection in MLA:
            b = adapter[f"{layer}.self_attn.{projection}.lora_B.weight"]
            assert b.abs().max() > 0, (layer, projection)
    assert any(".mlp.experts." in key and key.endswith("lora_B.weight") and v.abs().max() > 0
               for key, v in adapter.items())


@pytest.mark.trains
def test_fsdp_losses_equal_ddp(chain):
    ddp, fsdp = str(chain.get("ddp2") / "run"), str(chain.get("fsdp2") / "run")
    for field in ("loss", "mtp_loss"):
        want, got = losses(ddp, field), losses(fsdp, field)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in want), (field, got, want)
    for step, record in evals(ddp).items():
        for key in ("val_loss", "chat/loss", "val/mtp_loss"):
            assert evals(fsdp)[step][key] == pytest.approx(record[key], rel=1e-5), (step, key)
    start = read_jsonl(os.path.join(fsdp, "logs", "events_log.jsonl"))[0]
    assert start["strategy"] == "fsdp" and start["world_size"] == 2


@pytest.mark.trains
def test_fsdp_sigkill_then_resume_is_bit_identical(chain):
    out, reference = str(chain.get("killed") / "run"), str(chain.get("fsdp2") / "run")
    assert losses(out) == losses(reference) and losses(out, "mtp_loss") == losses(reference, "mtp_loss")
    keys = ("val_loss", "chat/loss", "val/mtp_loss", "val/mtp_acceptance")
    assert {s: [r[k] for k in keys] for s, r in evals(out).items()} == \
        {s: [r[k] for k in keys] for s, r in evals(reference).items()}
    kinds = [e["event"] for e in read_jsonl(os.path.join(out, "logs", "events_log.jsonl"))]
    assert kinds.count("resume") == 1 and kinds[-1] == "run_end"


@pytest.mark.trains
def test_merged_model_equals_base_plus_peft(chain, tiny_flash_dir, tmp_path):
    """use_adapter.py --merge: the trunk's logits equal transformers + plain peft on the base, and the MTP layer's
    kv_b_proj is the base's plus the adapter's scale * B @ A, in the Hub's layout."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from glmkit.model.mtp import attach_mtp_layers

    folder = chain.get("ddp2")
    adapter = str(folder / "run" / f"final-checkpoint-{STEPS}")
    merged = tmp_path / "merged"
    result = run_cli(["use_adapter.py", "--config", str(folder / "config.yaml"), "--adapter", adapter,
                      "--merge", str(merged), "--dtype", "float32"])
    assert result.returncode == 0, result.stderr[-2000:]
    base = AutoModelForCausalLM.from_pretrained(tiny_flash_dir, dtype=torch.float32)
    attach_mtp_layers(base)  # where the adapter's MTP LoRA goes (MtpModel's names); not used by the trunk's logits
    reference = PeftModel.from_pretrained(base, adapter).eval()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
        with reference.disable_adapter():
            untouched = reference(ids).logits
    assert (theirs - untouched).abs().max() > 1e-3 and (ours - theirs).abs().max() <= 1e-4
    lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    prefix = "base_model.model.layers.0.mtp_block.self_attn.kv_b_proj"
    a, b = lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"]
    key = f"model.layers.{MTP_LAYER}.self_attn.kv_b_proj.weight"

    def tensor(where):
        index = json.load(open(os.path.join(where, "model.safetensors.index.json")))["weight_map"]
        return load_file(os.path.join(where, index[key]))[key].float()

    delta = tensor(merged) - tensor(tiny_flash_dir)
    assert delta.abs().max() > 0 and torch.allclose(delta, (32 / 16) * (b @ a), atol=1e-6)  # alpha / r


@pytest.mark.trains
def test_serving_export_refuses_kv_b_proj_lora_and_names_vllms_class(chain, tmp_path):
    """vLLM does not apply LoRA to kv_b_proj (vllm#48974): an adapter that trained it is refused in one line naming
    --merge; the same adapter without it exports, per expert, with the class the servers load the base with."""
    folder = chain.get("ddp2")
    adapter = str(folder / "run" / f"final-checkpoint-{STEPS}")
    refused = run_cli(["use_adapter.py", "--config", str(folder / "config.yaml"), "--adapter", adapter,
                       "--export-serving", str(tmp_path / "served")])
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and not (tmp_path / "served").exists()
    assert "adapts kv_b_proj in 3 layer(s), and vLLM does not apply LoRA" in lines[0]
    assert "python use_adapter.py --merge OUT_DIR" in lines[0]
    # the adapter a user trains with lora.target_modules [q_a_proj, q_b_proj, kv_a_proj_with_mqa, o_proj]
    without = tmp_path / "without-kv-b"
    without.mkdir()
    tensors = {k: v for k, v in load_file(os.path.join(adapter, "adapter_model.safetensors")).items()
               if ".kv_b_proj." not in k}
    save_file(tensors, str(without / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    config["target_modules"] = [m for m in config["target_modules"] if m != "kv_b_proj"]
    (without / "adapter_config.json").write_text(json.dumps(config))
    from glmkit.model.serving_export import export_for_serving

    done = export_for_serving(load_config(str(folder / "config.yaml")).paths.model_dir, str(without),
                              str(tmp_path / "served"))
    assert done["architecture"] == "Glm4MoeLiteForCausalLM" and done["expert_layers"] == 2
    readme = (tmp_path / "served" / "README.md").read_text()
    assert "(Glm4MoeLiteForCausalLM: the class vLLM and SGLang serve it with)" in readme
    served = load_file(str(tmp_path / "served" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_A.weight" in served
    assert "base_model.model.model.layers.1.self_attn.q_a_proj.lora_A.weight" in served
    assert not any("kv_b_proj" in k or "mtp_block" in k for k in served)
    shutil.rmtree(tmp_path / "served")
