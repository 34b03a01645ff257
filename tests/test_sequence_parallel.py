"""Sequence parallelism (distributed.sequence_parallel): exact against one process, resumable across P, refused in
one line where it cannot work.

- slices: a collated batch cut into P slices keeps every target (shifted over the whole row first) and token once;
- parity, in-process over gloo (tests/sequence_parallel_worker.py, 4 processes): the all-to-all attention and the
  whole 4-bit model with attention and expert LoRA and gradient checkpointing, under DDP and FSDP, at P = 2 and 4,
  against one process: loss, every LoRA gradient and an eval of uneven shards;
- the trainer: 2 processes at P = 2 give the 1-process run's losses, evals and expert counts; its checkpoint resumes
  at P = 1 on the same 2 processes (grad accumulation 2 -> 1 keeps the rows per step) and still matches;
- refusals: every one a single line (config errors at load, the rest with exit 2 before any weight is read).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import ROOT, run_cli, shared_folder, write_tiny_config

from glmkit.config.load import load_config
from glmkit.config.schema import ConfigError
from glmkit.data.rows import IGNORE_INDEX, Collator, pack_rows
from glmkit.run.logs import latest_per_step, read_jsonl
from glmkit.train.loss import shifted_targets
from glmkit.train.sequence_parallel import SequenceParallel
from glmkit.train.step import target_tokens

TINY = os.path.join(ROOT, "configs", "tiny.yaml")


# ---------------------------------------------------------------------------
# Slices of a batch
# ---------------------------------------------------------------------------

def packed_batch(row: int = 16, size: int = 1):
    docs = [[7] * 5, list(range(10, 31)), [3, 4, 5], list(range(40, 52))]  # 41 tokens: 3 rows, documents crossing
    packed = pack_rows(docs, row, 1)
    rows = [{"input_ids": r, "position_ids": p} for r, p in zip(packed["input_ids"], packed["position_ids"])]
    return Collator(1, True, "longest", row, "varlen", pad_to_multiple_of=size)(rows)


@pytest.mark.parametrize("size", [2, 4])
def test_slices_keep_every_target_once_shifted_over_the_whole_row(size):
    batch = packed_batch()
    slices = [SequenceParallel(size, rank, None, 0, 1).local_batch(batch) for rank in range(size)]
    whole_targets = shifted_targets(batch["labels"])
    assert torch.equal(torch.cat([s["targets"] for s in slices], dim=1), whole_targets)
    for key in ("input_ids", "position_ids", "token_mask"):
        assert torch.equal(torch.cat([s[key] for s in slices], dim=1), batch[key])
    # a slice's last position predicts the next slice's first token: the boundary is not lost
    first_of_second = batch["input_ids"][0, 16 // size]
    assert slices[0]["targets"][0, -1] == first_of_second
    assert sum(target_tokens(s) for s in slices) == target_tokens(batch) > 0
    for s in slices:  # the segment boundaries stay the whole rows'; no labels to shift again
        assert torch.equal(s["cu_seqlens"], batch["cu_seqlens"]) and "labels" not in s
        assert s["sequence_group"] is None and s["input_ids"].shape == (3, 16 // size)
    assert SequenceParallel(1, 0, None, 0, 1).local_batch(batch) is batch


def test_unpacked_rows_are_padded_to_a_multiple_of_the_slices():
    rows = [{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [3, 4]}]
    batch = Collator(1, False, "longest", 64, "varlen", pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].shape == (2, 8)  # 5 rounded up to 8
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 10, 16]  # each row: its document, then its padding
    assert batch["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 3
    assert Collator(1, False, "longest", 64, "varlen")(rows)["input_ids"].shape == (2, 5)


# ---------------------------------------------------------------------------
# Parity against one process, in-process over gloo
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def eight_kv_model_dir(tmp_path_factory, tiny_model_dir):
    """`download_model.py --tiny air-8kv`: the tiny model with GLM-4.5-Air's 8 KV heads (P = 2, 4 or 8)."""
    def build(folder):
        code = (f"from glmkit.demo.tiny import write_tiny_checkpoint; write_tiny_checkpoint({str(folder)!r}, seed=0, "
                f"variant='air-8kv', tokenizer_from={tiny_model_dir!r})")
        assert run_cli(["-c", code]).returncode == 0
    return str(shared_folder(tmp_path_factory, "tiny-model-8kv", build))


@pytest.mark.trains  # four processes, each loading the model five times and training a micro-step
def test_attention_and_whole_model_equal_one_process_under_ddp_and_fsdp(tmp_path, eight_kv_model_dir, demo_corpus):
    shipped = load_config(os.path.join(ROOT, "training_config.yaml"),
                          [f"paths.model_dir={tmp_path / 'no-model'}"]).lora  # the shipped adapter, dropout aside
    config = write_tiny_config(tmp_path, eight_kv_model_dir, demo_corpus, {
        "lora.r": shipped.r, "lora.alpha": shipped.alpha, "lora.target_modules": shipped.target_modules,
        "lora.dropout": 0.0, "lora.target_parameters": ["gate_up_proj", "down_proj"],
        "memory.gradient_checkpointing": True, "distributed.num_processes": 4})
    out = tmp_path / "results"
    out.mkdir()
    result = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                      os.path.join(ROOT, "tests", "sequence_parallel_worker.py"), "--config", config, "--out", str(out)],
                     env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    layers = ranks[0]["layers"]
    for rank, results in enumerate(ranks):
        for size in (2, 4):
            attention = results[f"attention P={size}"]
            assert max(attention.values()) <= 1e-6, (rank, size, attention)
            for strategy in ("ddp", "fsdp"):
                got = results[f"{strategy} P={size}"]
                where = (rank, strategy, size, got)
                assert got["loss"] <= 1e-5 and got["tokens"] == 0, where
                assert got["grads"] <= 1e-5 and got["grads_compared"] == 32, where  # q/k/v/o and expert LoRA A, B
                assert got["eval_loss"] <= 1e-5 and got["eval_tokens"] == 0, where
                # q, k, v and the output exchanged per layer in forward, again in the recompute, and in backward
                assert got["exchanges"] == 4 * layers * 3, where


# ---------------------------------------------------------------------------
# The trainer: 2 processes at P = 2 against 1 process, and resumed at P = 1
# ---------------------------------------------------------------------------

STEPS = 4
SETTINGS = {"training.max_steps": STEPS, "training.max_seq_length": 128, "lora.dropout": 0.0, "lora.r": 16,
            "lora.alpha": 32, "lora.target_parameters": ["gate_up_proj", "down_proj"], "logging.eval_interval": 2,
            "checkpoint.interval": 2, "checkpoint.keep_top_k": 5, "logging.expert_stats_interval": 2,
            "distributed.num_processes": None}
TWO = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no")


def log(out, name) -> list[dict]:
    return read_jsonl(os.path.join(out, "logs", f"{name}.jsonl"))


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in latest_per_step(log(out, "training_log"))}


def assert_close(got: dict, want: dict, steps, rel=1e-5):
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


class Runs:
    def __init__(self, factory, model_dir, corpus):
        self.factory, self.model_dir, self.corpus, self.done = factory, model_dir, corpus, {}
        self.scratch = str(factory.mktemp("scratch"))

    def train(self, name, overrides, launch=(), args=()):
        folder = self.factory.mktemp(name)
        config = write_tiny_config(folder, self.model_dir, self.corpus,
                                   {**SETTINGS, "paths.scratch_dir": self.scratch, **overrides})
        extra = args(folder) if callable(args) else args
        result = run_cli([*launch, "train_qlora.py", "--config", config, *extra], env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return str(folder / "run"), result

    def get(self, name):
        if name not in self.done:
            self.done[name] = getattr(self, f"_{name}")()
        return self.done[name]

    def _one(self):
        return self.train("one", {})

    def _sp2(self):
        return self.train("sp2", {"distributed.sequence_parallel": 2}, launch=TWO)

    def _resumed_at_p1(self):
        def from_sp2(folder):
            copy = str(folder / "from-p2")
            shutil.copytree(os.path.join(self.get("sp2")[0], "checkpoint-2"), copy)
            return ("--resume_from", copy)
        return self.train("p1", {"distributed.sequence_parallel": 1}, launch=TWO, args=from_sp2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, demo_corpus):
    return Runs(tmp_path_factory, tiny_model_dir, demo_corpus)


@pytest.mark.trains
def test_two_processes_sharing_rows_give_the_one_process_losses(runs):
    one, _ = runs.get("one")
    sp2, result = runs.get("sp2")
    assert_close(losses(sp2), losses(one), range(1, STEPS + 1))
    evals = [{r["step"]: (r["val_loss"], r["val_tokens"]) for r in log(out, "eval_log")} for out in (one, sp2)]
    assert sorted(evals[1]) == [0, 2, 4] and {s: v[1] for s, v in evals[1].items()} == {s: v[1] for s, v in evals[0].items()}
    assert_close({s: v[0] for s, v in evals[1].items()}, {s: v[0] for s, v in evals[0].items()}, [0, 2, 4])
    # the router statistics: every token routed once, on the process that holds it
    experts = [[(r["interval_tokens"], [layer["counts"] for layer in r["layers"]]) for r in log(out, "expert_usage_log")]
               for out in (one, sp2)]
    assert experts[0] == experts[1] and len(experts[0]) == 2
    tokens = [[r["tokens"] for r in latest_per_step(log(out, "training_log"))] for out in (one, sp2)]
    assert tokens[0] == tokens[1]
    start = [e for e in log(sp2, "events_log") if e["event"] == "run_start"][0]
    assert start["world_size"] == 2 and start["config"]["distributed"]["sequence_parallel"] == 2
    assert start["effective_batch"] == 4  # rows per step: 2 micro x 2 accum x 1 group
    assert "2 micro x 2 accum x 1 group of 2 processes = 4 rows" in result.stdout


@pytest.mark.trains
def test_a_checkpoint_written_at_p2_resumes_at_p1_keeping_the_rows_per_step(runs):
    out, result = runs.get("resumed_at_p1")
    assert ("resuming on 2 processes (the checkpoint ran on 2 processes with sequence_parallel 2): "
            "optimization.grad_accum_steps 2 -> 1 keeps 4 rows per optimizer step") in result.stdout + result.stderr
    assert_close(losses(out), losses(runs.get("one")[0]), [3, 4])
    start = [e for e in log(out, "events_log") if e["event"] == "run_start"][0]
    assert start["config"]["distributed"]["sequence_parallel"] == 1 and start["effective_batch"] == 4


def test_a_change_of_p_that_cannot_keep_the_rows_is_refused_naming_what_works():
    from types import SimpleNamespace

    from glmkit.train.world_size import WorldSizeChange, keep_global_batch

    saved = {"world_size": 4, "distributed.sequence_parallel": 2, "optimization.micro_batch_per_gpu": 1,
             "optimization.grad_accum_steps": 3}  # 2 groups x 3 = 6 rows a step

    def cfg(size):
        return SimpleNamespace(optimization=SimpleNamespace(micro_batch_per_gpu=1, grad_accum_steps=3),
                               distributed=SimpleNamespace(sequence_parallel=size))

    assert keep_global_batch(saved, cfg(2), 4) is None
    accum, message = keep_global_batch(saved, cfg(4), 4)  # 1 group: accum 6
    assert accum == 6 and message == ("resuming on 4 processes with sequence_parallel 4 (the checkpoint ran on 4 "
                                      "processes with sequence_parallel 2): optimization.grad_accum_steps 3 -> 6 "
                                      "keeps 6 rows per optimizer step")
    assert keep_global_batch(saved, cfg(4), 8)[0] == 3  # more processes, more rows per process: the same 2 groups
    with pytest.raises(WorldSizeChange) as refused:
        keep_global_batch(saved, cfg(1), 4)  # 4 groups cannot share 6 rows
    assert str(refused.value) == (
        "cannot resume on 4 processes: the checkpoint trained 6 rows per optimizer step (1 micro x 3 accum x 2 groups "
        "of 2 processes), and 4 x micro_batch_per_gpu 1 does not divide 6; resume on 1, 2, 3, 6 processes, or start a "
        "new run")


# ---------------------------------------------------------------------------
# Refusals, one line each
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("attn, why", [
    ("sdpa", "sdpa's 4-D block mask covers whole rows"),
    ("eager", "eager attention's mask covers whole rows"),
])
def test_masked_attention_with_p_above_1_is_refused(attn, why):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"model.attn_implementation={attn}", "distributed.sequence_parallel=2",
                           "distributed.num_processes=2"])
    assert info.value.problems == [
        f"model.attn_implementation: sequence_parallel 2 needs varlen (each process attends over the whole row's "
        f"segment boundaries after the all-to-all); {why}, not this process's slice: set attn_implementation: varlen "
        f"or distributed.sequence_parallel: 1"]


def test_p_that_does_not_divide_the_processes_or_the_row_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["distributed.sequence_parallel=4", "distributed.num_processes=6",
                           "training.max_seq_length=250"])
    assert info.value.problems == [
        "distributed.sequence_parallel: 4 does not divide distributed.num_processes (6); the processes form groups of "
        "4 that share rows: use a divisor of 6",
        "training.max_seq_length: 250 is not a multiple of distributed.sequence_parallel (4); each process holds an "
        "equal slice of a row: use 248 or 252"]
    with pytest.raises(ConfigError, match=r"distributed.sequence_parallel: 3 is not allowed; use one of 1 \| 2 \| 4 \| 8"):
        load_config(TINY, ["distributed.sequence_parallel=3"])
    with pytest.raises(ConfigError, match=r"memory.offload_activations: moves what gradient checkpointing keeps"):
        load_config(TINY, ["memory.offload_activations=true", "memory.gradient_checkpointing=false"])


@pytest.mark.trains  # each starts train_qlora.py, which refuses before reading a weight
@pytest.mark.parametrize("overrides, message", [
    (["distributed.sequence_parallel=2"],
     "error: distributed.sequence_parallel: 2 does not divide the 1 processes of this launch: each group of 2 "
     "processes shares rows; use 1, or launch a multiple of 2 processes"),
    (["distributed.sequence_parallel=4"],
     "error: distributed.sequence_parallel: 4: the model has 2 KV heads (4 query heads), which 4 processes cannot "
     "share out evenly ({model_dir}); use 1, 2"),
    (["memory.offload_activations=true"],
     "error: memory.offload_activations needs a CUDA GPU (this process runs on cpu, where activations are in host "
     "memory already): set it to false"),
], ids=["processes", "kv-heads", "offload-on-cpu"])
def test_what_only_the_launch_knows_is_refused_in_one_line_with_exit_2(tmp_path, tiny_model_dir, demo_corpus,
                                                                       overrides, message):
    if torch.cuda.is_available() and "offload" in message:
        pytest.skip("offload is allowed on CUDA")
    config = write_tiny_config(tmp_path, tiny_model_dir, demo_corpus, {"distributed.num_processes": None})
    result = run_cli(["train_qlora.py", "--config", config, *[a for o in overrides for a in ("--set", o)]])
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == message.format(model_dir=tiny_model_dir)
    assert "Traceback" not in result.stderr
