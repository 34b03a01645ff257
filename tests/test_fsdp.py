"""FSDP2 on the 4-bit tiny model, 2 gloo processes on CPU: the same run as DDP with every layer's NF4 data sharded,
its checkpoints (the DDP adapter plus DCP optimizer shards), SIGKILL and resume, and resume on another world size.

One chain of short runs (6 steps, attention and expert LoRA together, the MTP layer trained too with the same
targets, dropout 0 so the runs are comparable across world sizes) is shared by every assertion:
  ddp2     2 processes, DDP                     the reference
  fsdp2    2 processes, FSDP                    == ddp2 within 1e-5 relative; half the 4-bit bytes per rank,
                                                loaded straight into the shards (a rank's share + one layer)
  killed   2 processes, FSDP, SIGKILL in step 3, then --resume on 2        == fsdp2 to the bit
  to1      fsdp2's checkpoint-2 resumed on 1 process (accum 2 -> 4), SIGKILL in step 5 after checkpoint-4
  to2      to1's checkpoint-4 resumed on 2 processes (accum 4 -> 2)       to1 and to2 == fsdp2 within fp tolerance
  ddp_to1  ddp2's checkpoint-4 resumed on 1 process                       == ddp2 within fp tolerance
"""

import json
import os
import shutil

import pytest
from conftest import ROOT, run_cli, write_tiny_config

from glmkit.run.logs import latest_per_step, read_jsonl

pytestmark = pytest.mark.trains  # every test here trains (make test-fast leaves them out)

STEPS = 6
# val_fraction 0.09: 193 validation rows, so at micro-batch 2 one rank evaluates 49 batches and the other 48 (FSDP
# ranks must still run every forward together, glmkit/train/evaluation.py)
SETTINGS = {"training.max_steps": STEPS, "training.max_seq_length": 128, "training.val_fraction": 0.09,
            "lora.dropout": 0.0, "mtp.train": True,
            "lora.target_parameters": ["gate_up_proj", "down_proj"], "logging.eval_interval": 2,
            "checkpoint.interval": 2, "checkpoint.keep_top_k": 5, "logging.expert_stats_interval": 2}
TWO = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no")


def losses(out, field: str = "loss") -> dict[int, float]:
    return {r["step"]: r[field] for r in latest_per_step(read_jsonl(os.path.join(out, "logs", "training_log.jsonl")))}


def events(out) -> list[dict]:
    return read_jsonl(os.path.join(out, "logs", "events_log.jsonl"))


def assert_close(got: dict, want: dict, steps, rel=1e-5):
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


class Chain:
    """The runs, each started the first time a test asks for it."""

    def __init__(self, tmp_path_factory, model_dir, corpus):
        self.factory, self.model_dir, self.corpus, self.done = tmp_path_factory, model_dir, corpus, {}
        self.scratch = str(tmp_path_factory.mktemp("scratch"))  # one tokenized cache for every run of the chain

    def config(self, name, strategy):
        folder = self.factory.mktemp(name)
        return folder, write_tiny_config(folder, self.model_dir, self.corpus, {
            **SETTINGS, "distributed.accelerate_config": strategy, "paths.scratch_dir": self.scratch})

    def run(self, name, strategy, launch=TWO, args=(), env=None, ok=True, folder_config=None):
        folder, config = folder_config or self.config(name, strategy)
        result = run_cli([*launch, "train_qlora.py", "--config", config, *args], env=env)
        if ok:
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            assert result.returncode != 0
        return folder, config, result

    def get(self, name):
        if name not in self.done:
            self.done[name] = getattr(self, f"_{name}")()
        return self.done[name]

    def _ddp2(self):
        return str(self.run("ddp2", "ddp")[0] / "run")

    def _fsdp2(self):
        return str(self.run("fsdp2", "fsdp")[0] / "run")

    def _killed(self):
        folder, config, _ = self.run("killed", "fsdp", env={"GLMKIT_FAULT_KILL_AT": "mid_step:3"}, ok=False)
        assert sorted(n for n in os.listdir(folder / "run") if "checkpoint" in n) == ["checkpoint-2"]
        _, _, resumed = self.run("killed", "fsdp", args=("--resume",), folder_config=(folder, config))
        return str(folder / "run"), resumed

    def _to1(self):
        source = os.path.join(self.get("fsdp2"), "checkpoint-2")
        folder, config = self.config("to1", "fsdp")
        copy = str(folder / "from-2-processes")
        shutil.copytree(source, copy)
        _, _, result = self.run("to1", "fsdp", launch=(), args=("--resume_from", copy),
                                env={"GLMKIT_FAULT_KILL_AT": "mid_step:5"}, ok=False, folder_config=(folder, config))
        return folder, config, result

    def _ddp_to1(self):
        folder, config = self.config("ddp_to1", "ddp")
        copy = str(folder / "from-2-processes")
        shutil.copytree(os.path.join(self.get("ddp2"), "checkpoint-4"), copy)
        _, _, result = self.run("ddp_to1", "ddp", launch=(), args=("--resume_from", copy),
                                folder_config=(folder, config))
        return str(folder / "run"), result

    def _to2(self):
        folder, config, _ = self.get("to1")
        _, _, result = self.run("to1", "fsdp", args=("--resume",), folder_config=(folder, config))
        return str(folder / "run"), result


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir, demo_corpus):
    return Chain(tmp_path_factory, tiny_model_dir, demo_corpus)


def test_fsdp_losses_equal_ddp_with_attention_and_expert_lora(chain):
    ddp, fsdp = chain.get("ddp2"), chain.get("fsdp2")
    assert_close(losses(fsdp), losses(ddp), range(1, STEPS + 1))
    evals = [{r["step"]: (r["val_loss"], r["val_tokens"]) for r in read_jsonl(os.path.join(out, "logs", "eval_log.jsonl"))}
             for out in (ddp, fsdp)]
    assert sorted(evals[1]) == [0, 2, 4, 6] and {s: v[1] for s, v in evals[1].items()} == {s: v[1] for s, v in evals[0].items()}
    assert_close({s: v[0] for s, v in evals[1].items()}, {s: v[0] for s, v in evals[0].items()}, [0, 2, 4, 6])
    # the MTP layer, its own FSDP unit, trained alongside: its loss and its acceptance at every eval as under DDP
    assert_close(losses(fsdp, "mtp_loss"), losses(ddp, "mtp_loss"), range(1, STEPS + 1))
    mtp = [{r["step"]: (r["val/mtp_loss"], r["val/mtp_acceptance"])
            for r in read_jsonl(os.path.join(out, "logs", "eval_log.jsonl"))} for out in (ddp, fsdp)]
    assert_close({s: v[0] for s, v in mtp[1].items()}, {s: v[0] for s, v in mtp[0].items()}, [0, 2, 4, 6])
    assert all(abs(mtp[1][s][1] - mtp[0][s][1]) <= 0.002 for s in mtp[0])  # a draft near a tie may flip
    start = events(fsdp)[0]
    assert start["strategy"] == "fsdp" and start["world_size"] == 2 and start["ddp_sync"] is None
    trainable = start["model_audit"]["trainable_params_by_group"]
    assert trainable["attention"] > 0 and trainable["routed_experts"] > 0  # both kinds of LoRA in the same run
    assert trainable["mtp"] > 0


def test_fsdp_shards_every_4bit_tensor_across_the_ranks(chain):
    """Measured from the tensors each rank holds: the packed NF4 data (experts included) and LoRA are split in
    two; the quantization statistics beside the data are the part that stays replicated."""
    ddp = events(chain.get("ddp2"))[0]["resident_by_rank"]
    fsdp = events(chain.get("fsdp2"))[0]["resident_by_rank"]
    assert ddp[0] == ddp[1] and fsdp[0] == fsdp[1]  # the tiny model's tensors split evenly
    assert 2 * fsdp[0]["packed_4bit_bytes"] == ddp[0]["packed_4bit_bytes"] > 0
    assert 2 * fsdp[0]["lora_bytes"] == ddp[0]["lora_bytes"] > 0
    assert 2 * fsdp[0]["other_frozen_bytes"] == ddp[0]["other_frozen_bytes"]
    assert fsdp[0]["quant_state_bytes"] == ddp[0]["quant_state_bytes"]
    resident = ("packed_4bit_bytes", "quant_state_bytes", "other_frozen_bytes", "lora_bytes")
    ratio = sum(fsdp[0][k] for k in resident) / sum(ddp[0][k] for k in resident)
    assert 0.5 <= ratio < 0.56, ratio
    # Loaded straight into the shards: at most a rank's share plus one whole layer (the tiny model's largest, its MTP
    # layer: an MoE layer's 135,168 B and eh_proj's [128, 256], 16,384 B), never the whole model as a replica holds
    # it (495,616 B).
    assert fsdp[0]["largest_layer_4bit_bytes"] == 135_168 + 16_384
    assert fsdp[0]["load_peak_4bit_bytes"] <= fsdp[0]["packed_4bit_bytes"] + fsdp[0]["largest_layer_4bit_bytes"]
    assert fsdp[0]["load_peak_4bit_bytes"] == 339_968  # counted as tensors are allocated and freed: deterministic
    assert fsdp[0]["load_peak_4bit_bytes"] < ddp[0]["packed_4bit_bytes"]
    assert "load_peak_4bit_bytes" not in ddp[0]
    logs_doc = open(os.path.join(ROOT, "docs", "LOGS.md"), encoding="utf-8").read()
    assert all(f"`{key}`" in logs_doc for key in fsdp[0])  # the log table names what an fsdp run adds


def test_fsdp_checkpoint_holds_the_ddp_adapter_and_sharded_optimizer(chain, tiny_model_dir):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ddp, fsdp = chain.get("ddp2"), chain.get("fsdp2")
    final = os.path.join(fsdp, f"final-checkpoint-{STEPS}")
    ours = load_file(os.path.join(final, "adapter_model.safetensors"))
    theirs = load_file(os.path.join(ddp, f"final-checkpoint-{STEPS}", "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs) and any(".mlp.experts." in k for k in ours)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and torch.allclose(ours[key], value, rtol=1e-4, atol=1e-6), key
    shards = sorted(os.listdir(os.path.join(final, "optimizer_sharded")))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not os.path.exists(os.path.join(final, "optimizer.bin"))
    with open(os.path.join(final, "COMPLETE"), encoding="utf-8") as fh:
        listed = json.load(fh)["files"]
    assert {"optimizer_sharded/.metadata", "optimizer_sharded/__1_0.distcp", "adapter_model.safetensors"} <= set(listed)
    from transformers.modeling_layers import MtpModel

    # A plain peft load of the FSDP run's adapter, its MTP LoRA included: onto transformers' model given its MTP
    # layer where MtpModel keeps it (glmkit/model/mtp.py; transformers looks for GLM's MTP weights at layers 46 and
    # 92, the tiny model's is layer 3).
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base._keys_to_ignore_on_load_unexpected = [r"model\.layers\.3\..*"]
    base.layers = MtpModel.from_pretrained(base).layers
    plain = PeftModel.from_pretrained(base, final)
    loaded = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(ours)


def test_fsdp_sigkill_then_resume_matches_uninterrupted_run(chain):
    out, resumed = chain.get("killed")
    reference = losses(chain.get("fsdp2"))
    assert losses(out) == reference  # to the bit: sharded AdamW state, RNG, data position all restored
    assert losses(out, "mtp_loss") == losses(chain.get("fsdp2"), "mtp_loss")
    kinds = [e["event"] for e in events(out)]
    assert kinds.count("resume") == 1 and kinds[-1] == "run_end"


def test_resume_on_one_process_then_on_two_keeps_the_global_batch(chain):
    reference = losses(chain.get("fsdp2"))
    folder, _, to1 = chain.get("to1")
    assert "optimization.grad_accum_steps 2 -> 4 keeps 8 rows per optimizer step" in to1.stdout + to1.stderr
    one = events(str(folder / "run"))
    start = [e for e in one if e["event"] == "run_start"][0]
    assert start["world_size"] == 1 and start["effective_batch"] == 8
    assert_close(losses(str(folder / "run")), reference, [3, 4])  # killed in step 5, after checkpoint-4
    out, to2 = chain.get("to2")
    assert "optimization.grad_accum_steps 4 -> 2 keeps 8 rows per optimizer step" in to2.stdout + to2.stderr
    assert_close(losses(out), reference, range(3, STEPS + 1))
    starts = [e for e in events(out) if e["event"] == "run_start"]
    assert [s["world_size"] for s in starts] == [1, 2] and {s["effective_batch"] for s in starts} == {8}


def test_ddp_resumed_on_one_process_keeps_the_global_batch(chain):
    out, result = chain.get("ddp_to1")
    assert "optimization.grad_accum_steps 2 -> 4 keeps 8 rows per optimizer step" in result.stdout + result.stderr
    assert_close(losses(out), losses(chain.get("ddp2")), range(5, STEPS + 1))


def test_world_size_change_that_cannot_keep_the_batch_is_refused_naming_what_works():
    from types import SimpleNamespace

    from glmkit.train.world_size import WorldSizeChange, keep_global_batch, worlds_that_keep

    saved = {"world_size": 4, "optimization.micro_batch_per_gpu": 2, "optimization.grad_accum_steps": 3}
    cfg = SimpleNamespace(optimization=SimpleNamespace(micro_batch_per_gpu=2, grad_accum_steps=3),
                          distributed=SimpleNamespace(sequence_parallel=1))
    assert keep_global_batch(saved, cfg, 4) is None and cfg.optimization.grad_accum_steps == 3
    accum, message = keep_global_batch(saved, cfg, 6)  # the decision is returned; the config is left alone
    assert accum == 2 and "3 -> 2 keeps 24 rows" in message and cfg.optimization.grad_accum_steps == 3
    with pytest.raises(WorldSizeChange) as refused:
        keep_global_batch(saved, cfg, 8)
    message = str(refused.value)
    assert message == ("cannot resume on 8 processes: the checkpoint trained 24 rows per optimizer step (2 micro x 3 "
                       "accum x 4 processes), and 8 x micro_batch_per_gpu 2 does not divide 24; resume on 1, 2, 3, 4, "
                       "6, 12 processes, or start a new run")
    assert worlds_that_keep(24, 5) == []
