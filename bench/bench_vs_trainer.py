#!/usr/bin/env python3
"""The kit's training loop against transformers' Trainer, on the same tiny GLM-4.5-Air model.

Both sides get the same everything, so the loss curves must agree and throughput is the only
difference left:

- model: `glmkit.model.load.load_model` (every Linear and the fused experts NF4) +
  `prepare_for_training` (LoRA via peft, gradient checkpointing), fp32 compute, and the very
  same initial LoRA weights (the kit's are saved and loaded into the Trainer's model);
- data: the packed rows the kit's loop actually consumed, recorded step by step from its real
  run (`train_qlora.main`), handed to the Trainer in that order (a sequential sampler) and
  collated on the fly by the kit's collator on both sides;
- optimizer: `glmkit.train.optim.make_optimizer_and_scheduler` (AdamW, warmup + cosine) for
  both, the same gradient accumulation, clipping at max_grad_norm, LoRA dropout 0;
- loss: the kit divides the summed token losses of a step by its target tokens; the Trainer
  passes `num_items_in_batch` (the step's `labels[..., 1:] != -100` count in transformers 5)
  to the model's loss, so each micro-batch's loss is its sum over that same count. The
  worker checks that the Trainer took that path (`model_accepts_loss_kwargs`).

Each run is a fresh subprocess (Accelerate's state is per process); kit and Trainer runs
alternate, and a step's time is the wall (and CPU) time between the starts of consecutive
optimizer steps, data fetch, forward/backward, optimizer and logging included. The first step
(warm-up) is left out; medians are reported.

    .venv/bin/python bench/bench_vs_trainer.py [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import benchlib

HUGE_INTERVAL = 1_000_000  # no eval or checkpoint inside the timed steps (both happen after the last one)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="kit/Trainer runs each, alternating order")
    p.add_argument("--seq-len", type=int, default=None, help="max_seq_length (default: configs/tiny.yaml's)")
    p.add_argument("--micro-batch", type=int, default=None, help="micro_batch_per_gpu (default: the config's)")
    p.add_argument("--grad-accum", type=int, default=None, help="grad_accum_steps (default: the config's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each run (default 1, see BENCHMARKS.md)")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders under scratch/bench/vs-trainer")
    p.add_argument("--out", default=benchlib.default_out("vs_trainer"))
    # internal: one side of the comparison, in its own process
    p.add_argument("--worker", choices=["kit", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def overrides(args, work_dir: str) -> list[str]:
    over = [f"training.max_steps={args.steps}", "lora.dropout=0", "quantization.compute_dtype=float32",
            f"logging.eval_interval={HUGE_INTERVAL}", f"checkpoint.interval={HUGE_INTERVAL}",
            f"paths.output_dir={work_dir}/run", f"paths.best_adapter_dir={work_dir}/best"]
    if args.seq_len:
        over.append(f"training.max_seq_length={args.seq_len}")
    if args.micro_batch:
        over.append(f"optimization.micro_batch_per_gpu={args.micro_batch}")
    if args.grad_accum:
        over.append(f"optimization.grad_accum_steps={args.grad_accum}")
    return over


def _clock() -> list[float]:
    return [time.perf_counter(), time.process_time()]


# ---------------------------------------------------------------------------
# Worker: the kit's real loop (train_qlora.main), observed from outside
# ---------------------------------------------------------------------------

def kit_worker(args) -> dict:
    import torch

    import train_qlora
    from glmkit.model import load as modeling
    from glmkit.run.logs import latest_per_step, read_jsonl
    from glmkit.train import step as stepping

    work = args.work_dir
    shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)
    shutil.rmtree(os.path.join(work, "best"), ignore_errors=True)
    starts, groups, threads = [], [], []
    original_next_group, original_prepare = stepping.next_group, modeling.prepare_for_training

    def next_group(step_iter):
        starts.append(_clock())
        threads.append(torch.get_num_threads())
        epoch, group = original_next_group(step_iter)
        groups.append(group)  # references only: converting here would bill the kit's step for it
        return epoch, group

    def prepare_for_training(model, cfg):
        from peft import get_peft_model_state_dict

        peft_model = original_prepare(model, cfg)
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        torch.save(state, os.path.join(work, "lora_init.pt"))
        return peft_model

    stepping.next_group, modeling.prepare_for_training = next_group, prepare_for_training
    argv = ["--config", benchlib.TINY_CONFIG]
    for item in overrides(args, work):
        argv += ["--set", item]
    rc = train_qlora.main(argv)
    end = _clock()
    if rc != 0:
        raise SystemExit(f"train_qlora.main exited {rc}")
    rows = [[_rows_of(batch) for batch in group] for group in groups]
    with open(os.path.join(work, "rows.json"), "w", encoding="utf-8") as fh:
        json.dump(rows, fh)
    log = latest_per_step(read_jsonl(os.path.join(work, "run", "logs", "training_log.jsonl")))
    return {"side": "kit", "starts": starts, "end": end, "threads": sorted(set(threads)),
            "loss": [r["loss"] for r in log], "lr": [r["lr"] for r in log], "grad_norm": [r["grad_norm"] for r in log],
            "tokens": [r["tokens"] for r in log], "kit_logged_tokens_per_sec": [r["tokens_per_sec"] for r in log]}


def _rows_of(batch) -> list[dict]:
    """The packed rows a collated micro-batch was made of (pad positions back to -1)."""
    import torch

    positions = torch.where(batch["token_mask"], batch["position_ids"], -1)
    return [{"input_ids": i, "position_ids": p} for i, p in zip(batch["input_ids"].tolist(), positions.tolist())]


# ---------------------------------------------------------------------------
# Worker: transformers.Trainer on the same model, init, rows, optimizer
# ---------------------------------------------------------------------------

def trainer_worker(args) -> dict:
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from glmkit.data import rows as data
    from glmkit.model import load as modeling
    from glmkit.train.optim import make_optimizer_and_scheduler

    work = args.work_dir
    cfg = benchlib.tiny_config(overrides(args, work))
    o = cfg.optimization
    torch.manual_seed(cfg.training.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.paths.model_dir)
    model = modeling.prepare_for_training(modeling.load_model(cfg), cfg)
    init = torch.load(os.path.join(work, "lora_init.pt"))
    set_peft_model_state_dict(model, init)
    loaded = get_peft_model_state_dict(model)
    assert all(torch.equal(loaded[k], init[k]) for k in init), "LoRA init was not copied"

    with open(os.path.join(work, "rows.json"), encoding="utf-8") as fh:
        groups = json.load(fh)
    micro_batches = [rows for group in groups for rows in group][: args.steps * o.grad_accum_steps]
    collator = data.make_collator(tokenizer, cfg)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(micro_batches)

        def __getitem__(self, i):
            return micro_batches[i]

    def collate(items):
        assert len(items) == 1  # one dataset item is one of the kit's micro-batches
        batch = collator(items[0])
        batch.pop("token_mask")  # bookkeeping the model does not take
        return batch

    starts, fed = [], []

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            starts.append(_clock())
            samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            fed.extend(b["input_ids"] for b in samples)  # compared after the run, not billed to the step
            return samples, num_items

    logged = {}

    class Capture(TrainerCallback):
        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged[state.global_step] = {"loss": logs["loss"], "lr": logs.get("learning_rate"),
                                             "grad_norm": logs.get("grad_norm")}

    optimizer, scheduler = make_optimizer_and_scheduler(model, cfg, args.steps)
    targs = TrainingArguments(
        output_dir=os.path.join(work, "trainer"), per_device_train_batch_size=1,
        gradient_accumulation_steps=o.grad_accum_steps, max_steps=args.steps, max_grad_norm=o.max_grad_norm,
        learning_rate=o.learning_rate, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False,
        disable_tqdm=True, seed=cfg.training.seed, gradient_checkpointing=False,  # already on (kit)
    )
    trainer = SameOrderTrainer(model=model, args=targs, train_dataset=Rows(), data_collator=collate,
                               optimizers=(optimizer, scheduler), callbacks=[Capture()])
    assert trainer.model_accepts_loss_kwargs, "Trainer would not pass num_items_in_batch to the model's loss"
    threads = torch.get_num_threads()
    trainer.train()
    end = _clock()
    expected = [collator(rows)["input_ids"] for rows in micro_batches]
    assert len(fed) == len(expected) and all(torch.equal(a, b) for a, b in zip(fed, expected)), \
        "the Trainer did not see the kit's micro-batches in the kit's order"
    steps = sorted(logged)
    tokens = [sum(sum(1 for p in row["position_ids"] if p >= 0) for rows in group for row in rows)
              for group in groups[: args.steps]]
    return {"side": "trainer", "starts": starts, "end": end, "threads": [threads],
            "loss": [logged[s]["loss"] for s in steps], "lr": [logged[s]["lr"] for s in steps],
            "grad_norm": [logged[s]["grad_norm"] for s in steps], "tokens": tokens,
            "loss_normalization": "num_items_in_batch", "same_order_checked": True}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

def step_times(result: dict) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of steps 2..N (start of step k to start of step k+1; the last to the end).

    The end of the last step is the end of the run and includes the final eval and save, so
    the last step is dropped too: intervals of steps 2..N-1."""
    starts = result["starts"]
    wall = [b[0] - a[0] for a, b in zip(starts, starts[1:])]
    cpu = [b[1] - a[1] for a, b in zip(starts, starts[1:])]
    return wall[1:], cpu[1:]


def run_worker(side: str, args, work_dir: str, index: int) -> dict:
    result_path = os.path.join(work_dir, f"{side}-{index}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--work-dir", work_dir,
           "--result", result_path, "--steps", str(args.steps), "--threads", str(args.threads)]
    for flag, value in (("--seq-len", args.seq_len), ("--micro-batch", args.micro_batch),
                        ("--grad-accum", args.grad_accum)):
        if value:
            cmd += [flag, str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=benchlib.REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} run {index} failed (exit {proc.returncode})")
    with open(result_path, encoding="utf-8") as fh:
        result = json.load(fh)
    result["process_seconds"] = time.perf_counter() - started
    return result


def summarize(result: dict) -> dict:
    wall, cpu = step_times(result)
    tokens = result["tokens"][1:len(wall) + 1]
    return {"step_seconds": benchlib.summary(wall), "step_cpu_seconds": benchlib.summary(cpu),
            "tokens_per_sec": benchlib.summary([t / s for t, s in zip(tokens, wall)]),
            "tokens_per_cpu_sec": benchlib.summary([t / s for t, s in zip(tokens, cpu)]),
            "timed_steps": len(wall)}


def max_abs_diff(a: list, b: list) -> float:
    return max((abs(x - y) for x, y in zip(a, b) if x is not None and y is not None), default=float("nan"))


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.quiet()
    if args.worker:
        benchlib.set_threads(args.threads)
        result = kit_worker(args) if args.worker == "kit" else trainer_worker(args)
        with open(args.result, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        return 0

    benchlib.ensure_tiny_assets()
    info = benchlib.machine_info()
    info["torch_threads"] = args.threads
    cfg = benchlib.tiny_config()
    work_dir = os.path.join(benchlib.SCRATCH, "bench", "vs-trainer")
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir)
    runs = {"kit": [], "trainer": []}
    for r in range(args.repeats):
        for side in (("kit", "trainer") if r % 2 == 0 else ("trainer", "kit")):
            result = run_worker(side, args, work_dir, r)
            runs[side].append(result)
            s = summarize(result)
            print(f"run {r + 1}/{args.repeats} {side:<8} {len(result['loss'])} steps, final loss "
                  f"{result['loss'][-1]:.6f}, median {s['tokens_per_sec']['median']:,.0f} real tokens/s "
                  f"({s['tokens_per_cpu_sec']['median']:,.0f} per CPU-s), process {result['process_seconds']:.0f} s",
                  flush=True)

    pairs = list(zip(runs["kit"], runs["trainer"]))
    loss_diffs = [max_abs_diff(k["loss"], t["loss"]) for k, t in pairs]
    lr_diffs = [max_abs_diff(k["lr"], t["lr"]) for k, t in pairs]
    gn_diffs = [max_abs_diff(k["grad_norm"], t["grad_norm"]) for k, t in pairs]
    kit_rerun_diff = max((max_abs_diff(runs["kit"][0]["loss"], k["loss"]) for k in runs["kit"][1:]), default=0.0)
    trainer_rerun_diff = max((max_abs_diff(runs["trainer"][0]["loss"], t["loss"]) for t in runs["trainer"][1:]),
                             default=0.0)
    summaries = {side: [summarize(r) for r in rs] for side, rs in runs.items()}
    tps = {side: benchlib.median([s["tokens_per_sec"]["median"] for s in ss]) for side, ss in summaries.items()}
    cps = {side: benchlib.median([s["tokens_per_cpu_sec"]["median"] for s in ss]) for side, ss in summaries.items()}
    ratio = benchlib.median([k["tokens_per_sec"]["median"] / t["tokens_per_sec"]["median"]
                             for k, t in zip(summaries["kit"], summaries["trainer"])])
    cpu_ratio = benchlib.median([k["tokens_per_cpu_sec"]["median"] / t["tokens_per_cpu_sec"]["median"]
                                 for k, t in zip(summaries["kit"], summaries["trainer"])])
    k0, t0 = runs["kit"][0], runs["trainer"][0]
    payload = {
        "benchmark": "vs_trainer",
        "command": "python bench/bench_vs_trainer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "settings": {"steps": args.steps, "repeats": args.repeats,
                     "max_seq_length": args.seq_len or cfg.training.max_seq_length,
                     "micro_batch": args.micro_batch or cfg.optimization.micro_batch_per_gpu,
                     "grad_accum": args.grad_accum or cfg.optimization.grad_accum_steps,
                     "learning_rate": cfg.optimization.learning_rate, "scheduler": cfg.optimization.lr_scheduler,
                     "warmup_steps": cfg.optimization.warmup_steps, "lora_r": cfg.lora.r,
                     "lora_dropout": 0.0, "compute_dtype": "float32", "threads": args.threads,
                     "loss_normalization": {"kit": "sum over the step's target tokens",
                                            "trainer": t0.get("loss_normalization")}},
        "loss_curves": {"kit": k0["loss"], "trainer": t0["loss"],
                        "abs_diff": [abs(a - b) for a, b in zip(k0["loss"], t0["loss"])]},
        "max_abs_loss_diff": max(loss_diffs),
        "max_abs_loss_diff_per_pair": loss_diffs,
        "max_abs_lr_diff": max(lr_diffs),
        "max_abs_grad_norm_diff": max(gn_diffs),
        "kit_rerun_max_abs_loss_diff": kit_rerun_diff,
        "trainer_rerun_max_abs_loss_diff": trainer_rerun_diff,
        "throughput": {"kit_real_tokens_per_sec": tps["kit"], "trainer_real_tokens_per_sec": tps["trainer"],
                       "kit_over_trainer": ratio,
                       "kit_real_tokens_per_cpu_sec": cps["kit"], "trainer_real_tokens_per_cpu_sec": cps["trainer"],
                       "kit_over_trainer_cpu": cpu_ratio,
                       "kit_logged_tokens_per_sec_median": benchlib.median(
                           [benchlib.median(r["kit_logged_tokens_per_sec"][1:]) for r in runs["kit"]])},
        "runs": {side: [{"summary": s, "process_seconds": r["process_seconds"], "threads": r["threads"]}
                        for s, r in zip(summaries[side], runs[side])] for side in runs},
    }
    print()
    print(benchlib.machine_line(info))
    print(render(payload))
    benchlib.write_json(args.out, payload)
    if not args.keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def render(payload: dict) -> str:
    t = payload["throughput"]
    table1 = benchlib.table(
        ["", "kit (train_qlora.py loop)", "transformers Trainer", "kit / Trainer"],
        [["real tokens/s, wall (median)", f"{t['kit_real_tokens_per_sec']:,.0f}",
          f"{t['trainer_real_tokens_per_sec']:,.0f}", f"{t['kit_over_trainer']:.3f}x"],
         ["real tokens per CPU-second (median)", f"{t['kit_real_tokens_per_cpu_sec']:,.0f}",
          f"{t['trainer_real_tokens_per_cpu_sec']:,.0f}", f"{t['kit_over_trainer_cpu']:.3f}x"]], align="lrrr")
    table2 = benchlib.table(
        ["loss-curve check", "value"],
        [["steps compared", len(payload["loss_curves"]["kit"])],
         ["max |loss_kit - loss_Trainer|", f"{payload['max_abs_loss_diff']:.2e}"],
         ["max |lr_kit - lr_Trainer|", f"{payload['max_abs_lr_diff']:.2e}"],
         ["max |grad_norm_kit - grad_norm_Trainer|", f"{payload['max_abs_grad_norm_diff']:.2e}"],
         ["kit rerun vs first kit run, max |loss diff|", f"{payload['kit_rerun_max_abs_loss_diff']:.2e}"],
         ["first / last loss (kit)",
          f"{payload['loss_curves']['kit'][0]:.4f} / {payload['loss_curves']['kit'][-1]:.4f}"]],
        align="lr")
    return table1 + "\n\n" + table2


if __name__ == "__main__":
    sys.exit(main())
