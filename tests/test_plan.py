"""The memory plan: exact 4-bit byte counts, GLM-4.5-Air sanity, JSON shape, CLI, tiny-model audit."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from glmkit.config.load import load_config
from glmkit.model.load import BASE_GROUPS
from glmkit.plan import fit as planmod
from glmkit.plan.weights import nf4_bytes

GB = 1e9
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
# 45 MoE layers x 128 experts x (gate + up + down) x hidden 4096 x moe_intermediate 1408.
GLM45_AIR_ROUTED = 45 * 128 * 3 * 4096 * 1408
JSON_KEYS = {
    "source", "strategy", "num_processes", "params_total", "quantized_params", "groups", "weights_bytes",
    "plain_path_weights_bytes", "plain_path_upcast_weights_bytes", "qlora_floor_bytes", "lora_params",
    "lora_bytes", "lora_grad_bytes", "optimizer_bytes", "activation_bytes", "layer_boundaries_bytes",
    "layer_peak_bytes", "dequantized_experts_bytes", "logits_and_loss_bytes", "per_gpu",
    "total_bytes_per_gpu", "gpu_memory_bytes", "gpu_memory_source", "fits", "verdict", "notes",
    "max_micro_batch_per_gpu", "attention_extra_bytes", "loss_chunk_tokens", "full_vocab_loss_bytes",
}


def write_yaml(tmp_path, text: str = "") -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"paths:\n  model_dir: {tmp_path / 'no-model-yet'}\n{text}", encoding="utf-8")
    return str(path)


def air_plan(tmp_path, *overrides, num_processes=4, gpu_memory_bytes=int(141 * GB)):
    """The plan at micro batch 1 unless an override says otherwise (the recipe's own is tested on its own)."""
    cfg = load_config(write_yaml(tmp_path), ["optimization.micro_batch_per_gpu=1", *overrides])
    return planmod.build_plan(cfg, gpu_memory_bytes=gpu_memory_bytes, num_processes=num_processes)


@pytest.fixture(scope="module")
def air(tmp_path_factory):
    """GLM-4.5-Air, built-in architecture, defaults: DDP x 4, micro batch 1 x 4096, 141 GB."""
    return air_plan(tmp_path_factory.mktemp("air"))


# ---------------------------------------------------------------------------
# 4-bit bytes: the formula against what bitsandbytes really stores
# ---------------------------------------------------------------------------

def _stored_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    import bitsandbytes.functional as F

    data, state = F.quantize_4bit(torch.randn(numel, dtype=torch.bfloat16), blocksize=blocksize,
                                  compress_statistics=double_quant, quant_type="nf4")
    tensors = [data, state.absmax, state.code]
    if double_quant:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("numel", [64, 4096, 19205, 64 * 256 * 3 + 1])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_bytes_equal_bitsandbytes_storage(numel, double_quant, blocksize):
    assert nf4_bytes(numel, blocksize, double_quant) == _stored_bytes(numel, blocksize, double_quant)


def test_nf4_double_quant_is_the_qlora_4_127_bits():
    numel = 64 * 256 * 1000
    assert nf4_bytes(numel) * 8 / numel == pytest.approx(4.127, abs=0.001)


# ---------------------------------------------------------------------------
# GLM-4.5-Air from the built-in architecture
# ---------------------------------------------------------------------------

def test_air_parameter_counts(air):
    assert air["source"] == "builtin"
    assert air["model"] == "zai-org/GLM-4.5-Air"
    # 106.85 B without the MTP layer, which transformers does not build.
    assert 100e9 < air["params_total"] < 110e9
    routed = air["groups"]["routed_experts"]
    assert routed["params"] == GLM45_AIR_ROUTED  # ~99.66 B
    assert routed["quantized_params"] == routed["params"]
    assert air["groups"]["embeddings"]["params"] == air["groups"]["lm_head"]["params"] == 151552 * 4096
    assert air["groups"]["router"]["quantized_params"] == 0


def test_air_weight_bytes(air):
    assert 55 * GB < air["weights_bytes"] < 60 * GB
    assert air["plain_path_weights_bytes"] > 200 * GB
    assert 390 * GB < air["plain_path_upcast_weights_bytes"] < 420 * GB
    assert air["weights_bytes"] == pytest.approx(air["qlora_floor_bytes"], rel=0.03)
    assert air["weights_bytes"] == sum(g["bytes"] for g in air["groups"].values())


def test_air_fits_one_h200_with_ddp(air):
    assert air["strategy"] == "ddp"
    assert air["per_gpu"]["weights"] == air["weights_bytes"]  # a full replica per GPU
    assert air["fits"] is True
    assert air["total_bytes_per_gpu"] < 141 * GB
    assert air["plain_path_fits"] is False
    # Recomputing one MoE layer dequantizes its experts: 128 x 3 x 4096 x 1408 bf16 values.
    assert air["dequantized_experts_bytes"] == 128 * 3 * 4096 * 1408 * 2
    assert air["verdict"].startswith("memory plan: FITS")
    assert "\n" not in air["verdict"]


def test_air_lora_on_attention(air):
    # r=16 on q, k, v, o of 46 layers: 16 x ((4096+12288) + 2 x (4096+1024) + (12288+4096)).
    assert air["lora_params"] == 46 * 16 * (2 * (4096 + 12288) + 2 * (4096 + 1024))
    assert air["lora_bytes"] == air["lora_grad_bytes"] == 4 * air["lora_params"]
    assert air["optimizer_bytes"] == 8 * air["lora_params"]


def test_air_json_keys_and_serialisable(air):
    assert JSON_KEYS <= set(air)
    assert set(BASE_GROUPS) <= set(air["groups"])
    assert json.loads(json.dumps(air)) == air


def test_fsdp_shards_the_packed_weights_and_keeps_the_4bit_statistics_whole(tmp_path, air):
    from glmkit.plan.weights import build_meta_model, enumerate_tensors, load_architecture, replicated_bytes

    fsdp = air_plan(tmp_path, "distributed.accelerate_config=fsdp")
    assert fsdp["strategy"] == "fsdp"
    cfg = load_config(write_yaml(tmp_path))
    tensors = enumerate_tensors(build_meta_model(load_architecture(cfg)[0], "bfloat16"))
    whole = sum(replicated_bytes(t, cfg.quantization) for t in tensors)
    # double quant: a uint8 absmax per 64 values (and its small nested state) stays on every GPU
    assert 0.015 < whole / air["weights_bytes"] < 0.04
    assert fsdp["per_gpu"]["weights"] == (air["weights_bytes"] - whole) // 4 + whole
    assert 0 < fsdp["per_gpu"]["gathered_layer"] < 2 * 2 * GB  # the layer computed and the one prefetched
    assert fsdp["total_bytes_per_gpu"] < air["total_bytes_per_gpu"] - 30 * GB


@pytest.mark.parametrize("name", ["zai-org/GLM-4.6", "zai-org/GLM-4.5", "zai-org/GLM-4.7"])
def test_glm46_and_glm45_355b_need_fsdp_and_fit_four_h200_with_it(tmp_path, name):
    ddp = air_plan(tmp_path, f"model.name_or_path={name}")
    assert ddp["model"] == name and ddp["source"] == "builtin" and ddp["model_type"] == "glm4_moe"
    # 92 layers (3 dense), 160 routed experts of 3 x 5120 x 1536: ~336B of the ~353B parameters of the trunk,
    # plus the MTP layer (model.layers.92: one MoE layer and eh_proj, ~4B)
    assert ddp["groups"]["routed_experts"]["params"] == 89 * 160 * 3 * 5120 * 1536
    mtp = ddp["groups"]["mtp"]["params"]
    assert 160 * 3 * 5120 * 1536 + 2 * 5120 * 5120 < mtp < 4.1e9
    assert 352e9 < ddp["params_total"] - mtp < 354e9 and 180 * GB < ddp["weights_bytes"] < 190 * GB
    assert ddp["fits"] is False and ddp["max_micro_batch_per_gpu"] == 0
    assert ddp["verdict"].endswith("do not fit one GPU: shard them with distributed.accelerate_config: fsdp "
                                   "(docs/SCALING.md)")
    fsdp = air_plan(tmp_path, f"model.name_or_path={name}", "distributed.accelerate_config=fsdp")
    assert fsdp["fits"] is True and fsdp["max_micro_batch_per_gpu"] >= 1
    assert fsdp["total_bytes_per_gpu"] < 141 * GB and fsdp["verdict"].startswith("memory plan: FITS")
    recipe = planmod.build_plan(load_config(write_yaml(tmp_path), [f"model.name_or_path={name}",
                                                                   "distributed.accelerate_config=fsdp"]),
                                gpu_memory_bytes=int(141 * GB), num_processes=4)
    assert recipe["fits"] is True  # the shipped recipe's micro batch (4 x 4096) on 4 x H200
    if name.endswith("4.6"):
        print("GLM-4.6 fsdp x 4, recipe:", recipe["verdict"])


def test_the_mtp_layer_is_planned_like_a_decoder_layer(tmp_path, air):
    """GLM-4.5-Air's model.layers.46: a MoE layer (attention with QKV bias, 128 experts, a shared expert, the
    router), eh_proj [4096, 8192] and five norms, 4-bit where a decoder layer is; not in the plain path, which
    never loads it. mtp.train adds its attention LoRA and one more layer's activations."""
    attention = 2 * 4096 * 96 * 128 + 2 * 4096 * 8 * 128 + 96 * 128 + 2 * 8 * 128
    shared, router, eh_proj, norms = 3 * 4096 * 1408, 128 * 4096 + 128, 4096 * 8192, 5 * 4096
    mtp = air["groups"]["mtp"]
    assert mtp["params"] == GLM45_AIR_ROUTED // 45 + attention + shared + router + eh_proj + norms
    assert mtp["quantized_params"] == mtp["params"] - router - norms - (96 * 128 + 2 * 8 * 128)  # less biases
    assert mtp["plain_path_bytes"] == 0 and 1.2 * GB < mtp["bytes"] < 1.3 * GB
    assert any(note.startswith("the MTP layer (2,375,059,584 params) is loaded") for note in air["notes"])
    trained = air_plan(tmp_path, "mtp.train=true")
    r = 16  # lora.r: q, k, v, o of the MTP layer's attention
    assert trained["lora_params"] - air["lora_params"] == r * (2 * (4096 + 96 * 128) + 2 * (4096 + 8 * 128))
    assert trained["lora_params_by_group"]["mtp"] == trained["lora_params"] - air["lora_params"]
    assert trained["activation_bytes"] > air["activation_bytes"] and trained["fits"]


def test_without_checkpointing_every_layer_keeps_its_experts(tmp_path, air):
    plan = air_plan(tmp_path, "memory.gradient_checkpointing=false")
    assert plan["dequantized_experts_bytes"] == 45 * air["dequantized_experts_bytes"]
    assert plan["fits"] is False
    assert "DOES NOT FIT" in plan["verdict"] and "gradient_checkpointing" in plan["verdict"]


def test_activations_grow_with_tokens(tmp_path, air):
    plan = air_plan(tmp_path, "optimization.micro_batch_per_gpu=2")
    # Chunked loss: the target tokens' hidden states and their gradient grow with the tokens, one chunk
    # of logits (221 tokens x 151552, bf16 + two fp32 copies) does not.
    assert plan["logits_and_loss_bytes"] - air["logits_and_loss_bytes"] == 2 * 4096 * 4096 * 2
    assert air["loss_chunk_tokens"] == 221
    assert air["logits_and_loss_bytes"] == 2 * 4096 * 4096 * 2 + 221 * 151552 * 10
    # What the full-vocabulary loss would hold: fp32 log-softmax, its gradient in and out (12 bytes a logit).
    assert plan["full_vocab_loss_bytes"] == 2 * air["full_vocab_loss_bytes"] == 2 * 4096 * 151552 * 12
    assert plan["activation_bytes"] > air["activation_bytes"]


def test_attention_is_priced_per_implementation(tmp_path, air):
    assert air["attn_implementation"] == "varlen" and air["attention_extra_bytes"] == 0
    sdpa = air_plan(tmp_path, "model.attn_implementation=sdpa")
    # the 4-D block mask (bool, and the bf16 bias the kernel makes of it) and K/V expanded from 8 to 96 heads
    mask, expanded = 4096 * 4096 * 3, 4096 * 2 * (96 - 8) * 128 * 2
    assert sdpa["attention_extra_bytes"] == mask + expanded
    assert sdpa["layer_peak_bytes"] - air["layer_peak_bytes"] == 2 * (mask + expanded)
    eager = air_plan(tmp_path, "model.attn_implementation=eager")
    assert eager["attention_extra_bytes"] == 96 * 4096 * 4096 * (2 + 4)
    assert eager["max_micro_batch_per_gpu"] < sdpa["max_micro_batch_per_gpu"] <= air["max_micro_batch_per_gpu"]


def test_largest_micro_batch_that_fits(tmp_path, air):
    largest = air["max_micro_batch_per_gpu"]
    assert largest >= 4  # GLM-4.5-Air at 4096 tokens on a 141 GB H200, varlen + chunked loss
    at_largest = air_plan(tmp_path, f"optimization.micro_batch_per_gpu={largest}")
    one_more = air_plan(tmp_path, f"optimization.micro_batch_per_gpu={largest + 1}")
    assert at_largest["fits"] and not one_more["fits"]
    assert at_largest["max_micro_batch_per_gpu"] == one_more["max_micro_batch_per_gpu"] == largest
    assert f"lower optimization.micro_batch_per_gpu to {largest}" in one_more["verdict"]
    assert air["verdict"].endswith(f"micro batches up to {largest} fit")
    longer = air_plan(tmp_path, "training.max_seq_length=8192")
    assert longer["max_micro_batch_per_gpu"] < largest
    assert air_plan(tmp_path, gpu_memory_bytes=int(60 * GB))["max_micro_batch_per_gpu"] == 0


# ---------------------------------------------------------------------------
# Long rows: sequence parallelism and activation offload (docs/LONG_CONTEXT.md)
# ---------------------------------------------------------------------------

LONG = "training.max_seq_length=131072"


def test_a_128k_row_on_four_h200_fits_only_shared_by_four_gpus(tmp_path):
    alone = air_plan(tmp_path, LONG)
    assert not alone["fits"] and round(alone["total_bytes_per_gpu"] / GB, 1) == 265.5
    assert alone["verdict"].endswith("; set distributed.sequence_parallel: 4 (120.6 GB per GPU, 32,768 tokens each; "
                                     "docs/LONG_CONTEXT.md)")
    options = {(o["sequence_parallel"], o["offload_activations"]): o for o in alone["sequence_parallel_options"]}
    assert list(options) == [(1, False), (2, False), (4, False), (1, True), (2, True), (4, True)]
    assert [key for key, o in options.items() if o["fits"]] == [(4, False), (4, True)]
    assert round(options[(2, False)]["total_bytes_per_gpu"] / GB, 1) == 174.5
    ddp = air_plan(tmp_path, LONG, "distributed.sequence_parallel=4")
    fsdp = air_plan(tmp_path, LONG, "distributed.sequence_parallel=4", "distributed.accelerate_config=fsdp")
    assert (round(ddp["total_bytes_per_gpu"] / GB, 1), round(fsdp["total_bytes_per_gpu"] / GB, 1)) == (120.6, 80.1)
    assert ddp["fits"] and fsdp["fits"] and "shared by 4 GPUs (32,768 each)" in ddp["verdict"]
    # A GPU holds a quarter of the row (32,768 tokens) plus the exchange around attention: the attention output
    # twice, kept for backward (and as much again in gradients); q, k, v of the slice and one exchange's buffers.
    c, q, kv, tokens = 2, 96 * 128, 8 * 128, 32768
    assert ddp["tokens_per_micro_batch"] == tokens
    assert ddp["sequence_parallel_bytes"] == 2 * c * q * tokens + c * (q + 2 * kv) * tokens + 2 * c * q * tokens
    quarter = air_plan(tmp_path, "training.max_seq_length=32768")
    assert ddp["activation_bytes"] == quarter["activation_bytes"] + ddp["sequence_parallel_bytes"]


def test_activation_offload_moves_the_layer_inputs_to_host_memory(tmp_path):
    ddp = air_plan(tmp_path, LONG, "distributed.sequence_parallel=4")
    offload = air_plan(tmp_path, LONG, "distributed.sequence_parallel=4", "memory.offload_activations=true")
    # every checkpointed layer's input but the one recomputed; the last layer's output stays: 45 of 47 boundaries
    moved = 45 * 32768 * 4096 * 2
    assert offload["offloaded_activation_bytes"] == moved and round(moved / GB, 1) == 12.1
    assert offload["layer_boundaries_bytes"] == 2 * 32768 * 4096 * 2
    assert offload["total_bytes_per_gpu"] == ddp["total_bytes_per_gpu"] - moved


def test_the_128k_recipe_fits_four_h200():
    cfg = load_config(os.path.join(ROOT, "configs", "glm45-air-128k.yaml"),
                      [f"paths.model_dir={os.path.join(ROOT, 'no-such-model-dir')}"])
    plan = planmod.build_plan(cfg, gpu_memory_bytes=int(141 * GB))  # distributed.num_processes: 4
    assert (plan["num_processes"], plan["sequence_parallel"], plan["max_seq_length"]) == (4, 4, 131072)
    assert plan["fits"] and plan["max_micro_batch_per_gpu"] == cfg.optimization.micro_batch_per_gpu == 1
    assert round(plan["total_bytes_per_gpu"] / GB, 1) == 120.6


def test_sequence_parallel_the_launch_cannot_split_is_a_plan_error(tmp_path, tiny_model_dir):
    from glmkit.plan.weights import PlanError

    with pytest.raises(PlanError, match=r"sequence_parallel: 4 does not divide the 2 processes planned for"):
        air_plan(tmp_path, "distributed.sequence_parallel=4", num_processes=2)
    cfg = load_config(TINY_CONFIG, [f"paths.model_dir={tiny_model_dir}", "distributed.sequence_parallel=4",
                                    "distributed.num_processes=4"])
    with pytest.raises(PlanError, match=r"sequence_parallel: 4: the model has 2 KV heads \(4 query heads\)"):
        planmod.build_plan(cfg, num_processes=4)


def test_shipped_recipe_uses_a_micro_batch_the_plan_supports():
    cfg = load_config(os.path.join(ROOT, "training_config.yaml"),
                      [f"paths.model_dir={os.path.join(ROOT, 'no-such-model-dir')}"])
    plan = planmod.build_plan(cfg, gpu_memory_bytes=int(141 * GB), num_processes=4)
    assert plan["fits"] and 1 < cfg.optimization.micro_batch_per_gpu <= plan["max_micro_batch_per_gpu"]
    # the effective batch of the original 1 x 16 recipe is kept
    assert cfg.optimization.micro_batch_per_gpu * cfg.optimization.grad_accum_steps == 16


def test_experts_left_in_bf16_match_the_plain_path(tmp_path):
    plan = air_plan(tmp_path, "quantization.quantize_experts=false")
    routed = plan["groups"]["routed_experts"]
    assert routed["bytes"] == routed["plain_path_bytes"] == 2 * GLM45_AIR_ROUTED
    assert plan["dequantized_experts_bytes"] == 0
    assert plan["fits"] is False


def test_lora_on_expert_parameters_counts_every_expert(tmp_path, air):
    plan = air_plan(tmp_path, "lora.target_parameters=[mlp.experts.gate_up_proj]", "lora.dropout=0")
    # PEFT's ParamWrapper on [E, 2*1408, 4096]: lora_A [E*r, .] and lora_B [., E*r].
    assert plan["lora_params"] - air["lora_params"] == 45 * 128 * 16 * (2 * 1408 + 4096)


def test_gpu_memory_from_config_when_no_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the plan uses its detected memory")
    cfg = load_config(write_yaml(tmp_path), ["distributed.gpu_memory_gb=80"])
    plan = planmod.build_plan(cfg, num_processes=1)
    assert plan["gpu_memory_bytes"] == 80 * GB
    assert plan["gpu_memory_source"] == "distributed.gpu_memory_gb"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def test_run_plan_cli_prints_table_and_verdict(tmp_path, capsys):
    cfg = load_config(write_yaml(tmp_path))
    assert planmod.run_plan_cli(cfg, as_json=False) == 0
    out = capsys.readouterr().out
    assert "routed_experts" in out and "built-in GLM-4.5-Air architecture" in out
    assert "largest micro_batch_per_gpu that fits at 4096 tokens: " in out
    assert "lm_head + loss, chunked" in out and "(varlen)" in out
    assert out.strip().splitlines()[-1].startswith("memory plan: ")


def test_run_plan_cli_json_is_one_object(tmp_path, capsys):
    cfg = load_config(write_yaml(tmp_path))
    assert planmod.run_plan_cli(cfg, as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert JSON_KEYS <= set(data)


def test_check_exits_3_when_it_does_not_fit(tmp_path, capsys):
    path = write_yaml(tmp_path)
    assert planmod.main(["--config", path, "--check", "--set", "distributed.gpu_memory_gb=20"]) == 3
    line = capsys.readouterr().out.strip()
    assert line.startswith("memory plan: DOES NOT FIT") and "\n" not in line


def test_unreadable_config_json_is_one_line_error(tmp_path, capsys):
    model_dir = tmp_path / "no-model-yet"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "no_such_model"}', encoding="utf-8")
    cfg = load_config(write_yaml(tmp_path))
    assert planmod.run_plan_cli(cfg, as_json=False) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("plan error: ") and "\n" not in err


# ---------------------------------------------------------------------------
# The tiny model: the plan against the real 4-bit model, group by group
# ---------------------------------------------------------------------------

def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


@pytest.mark.skipif(not (_importable("glmkit.model.load") and _importable("glmkit.demo.tiny") and os.path.isfile(TINY_CONFIG)),
                    reason="glmkit.model.load / glmkit.demo.tiny / configs/tiny.yaml not written yet")
def test_plan_agrees_with_audit_of_loaded_tiny_model(tmp_path, tiny_model_dir):
    from glmkit.model.load import audit_model, load_model, prepare_for_training

    model_dir = tiny_model_dir
    cfg = load_config(TINY_CONFIG, [f"paths.model_dir={model_dir}", f"paths.output_dir={tmp_path / 'out'}"])
    plan = planmod.build_plan(cfg, num_processes=1)
    assert plan["source"] == "config.json"
    model = load_model(cfg, "cpu")
    audit = audit_model(model)
    for name in BASE_GROUPS:
        planned, real = plan["groups"][name], audit["groups"][name]
        assert planned["params"] == real["params"], name
        assert planned["quantized_params"] == real["quantized_params"], name
        assert planned["bytes"] == pytest.approx(real["bytes"], rel=0.01), name
    assert plan["weights_bytes"] == pytest.approx(audit["bytes_total"], rel=0.01)
    lora = audit_model(prepare_for_training(model, cfg))["groups"]["lora"]
    assert plan["lora_params"] == lora["params"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans without visible GPUs")
def test_without_gpus_the_plan_assumes_the_recipes_node_and_says_so(tmp_path):
    """People plan before renting: with no GPU here and distributed.num_processes null, the plan is for 4 GPUs of
    distributed.gpu_memory_gb, named as assumed. GLM-4.6 with fsdp fits them (it used to say fsdp x 1, no fit)."""
    cfg = load_config(write_yaml(tmp_path), ["model.name_or_path=zai-org/GLM-4.6", "distributed.accelerate_config=fsdp"])
    plan = planmod.build_plan(cfg)
    assert plan["num_processes"] == 4 and plan["num_processes_assumed"] is True and plan["fits"]
    assert "(fsdp x 4 assumed: no GPU here; micro batch 4 x 4096 tokens;" in plan["verdict"]
    assert any("planned for the recipe's node, 4 GPUs of distributed.gpu_memory_gb (141 GB)" in n for n in plan["notes"])
    counted = planmod.build_plan(load_config(write_yaml(tmp_path), ["distributed.num_processes=2"]))
    assert counted["num_processes"] == 2 and not counted["num_processes_assumed"] and "assumed" not in counted["verdict"]


@pytest.mark.parametrize("overrides, processes, advice, applied", [
    # DDP cannot hold GLM-4.6's 184 GB of 4-bit weights on one GPU: shard them over the same 4
    (["model.name_or_path=zai-org/GLM-4.6"], 4,
     "the 4-bit weights alone (186.5 GB) do not fit one GPU: shard them with distributed.accelerate_config: fsdp",
     ["model.name_or_path=zai-org/GLM-4.6", "distributed.accelerate_config=fsdp"]),
    # on one GPU no micro-batch fits, fsdp or not: more GPUs
    (["model.name_or_path=zai-org/GLM-4.6", "distributed.accelerate_config=fsdp"], 1,
     "shard over 2 GPUs: distributed.accelerate_config: fsdp, distributed.num_processes 2",
     ["model.name_or_path=zai-org/GLM-4.6", "distributed.accelerate_config=fsdp", "distributed.num_processes=2",
      "optimization.micro_batch_per_gpu=3"]),
    # too many rows: the largest micro-batch that fits
    (["optimization.micro_batch_per_gpu=32"], 4, "lower optimization.micro_batch_per_gpu to 11",
     ["optimization.micro_batch_per_gpu=11"]),
])
def test_the_advice_names_a_change_that_fits(tmp_path, overrides, processes, advice, applied):
    """A plan that does not fit names one change, and that change, applied, fits (never advice that cannot)."""
    cfg = load_config(write_yaml(tmp_path), overrides)
    plan = planmod.build_plan(cfg, gpu_memory_bytes=int(141 * GB), num_processes=processes)
    assert not plan["fits"] and advice in plan["advice"] and plan["verdict"].endswith(plan["advice"])
    fixed = load_config(write_yaml(tmp_path), applied)
    n = fixed.distributed.num_processes or processes
    assert planmod.build_plan(fixed, gpu_memory_bytes=int(141 * GB), num_processes=n)["fits"]


def test_when_nothing_fits_the_advice_says_so(tmp_path):
    plan = planmod.build_plan(load_config(write_yaml(tmp_path)), gpu_memory_bytes=int(10 * GB), num_processes=4)
    assert plan["advice"] == ("no setting the plan knows makes it fit GPUs of 10.0 GB: use GPUs with more memory "
                              "(distributed.gpu_memory_gb) or a smaller model")
