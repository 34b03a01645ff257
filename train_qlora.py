#!/usr/bin/env python3
"""QLoRA continued pre-training of GLM-4.5-Air with Accelerate.

    accelerate launch train_qlora.py --config training_config.yaml [--resume | --resume_from PATH]
    python train_qlora.py --config configs/tiny.yaml          # the CPU demo
    python train_qlora.py --config training_config.yaml --plan [--json]

Every expert is NF4, documents are packed with a block-diagonal mask, and everything the
dashboard shows is written to <paths.output_dir>/logs/*.jsonl. A step is an optimizer step.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from glmkit import checkpoint as ckpt
from glmkit.faults import maybe_kill
from glmkit.config import add_config_arguments, config_from_args
from glmkit.logs import RunLogs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    resume.add_argument("--resume_from", metavar="PATH", help="continue from this checkpoint folder")
    parser.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit")
    parser.add_argument("--json", action="store_true", help="with --plan: one JSON object")
    parser.add_argument("--force", action="store_true", help="start even if the memory plan says it won't fit")
    return parser.parse_args(argv)


def train(cfg, args, accelerator, logs, state) -> int:
    from glmkit import data, model as modeling, training
    from glmkit.router_stats import RouterStats
    from transformers import AutoTokenizer

    # ---- setup: data, model, optimizer -------------------------------------------------
    t, o, lg = cfg.training, cfg.optimization, cfg.logging
    torch.manual_seed(t.seed)
    resume_path = training.resume_checkpoint(cfg, args, accelerator, logs)
    modeling.check_model_dir(cfg)
    planned_memory = training.memory_plan(cfg, accelerator, args.force)
    tokenizer = AutoTokenizer.from_pretrained(cfg.paths.model_dir)
    corpus = data.load_corpus(cfg)
    with accelerator.main_process_first():
        cache_dir = f"{cfg.paths.scratch_dir}/tokenized/{corpus.fingerprint}"
        train_rows = data.tokenize_split(corpus.train_docs, tokenizer, cfg, cache_dir, "train")
        val_rows = data.tokenize_split(corpus.val_docs, tokenizer, cfg, cache_dir, "val")
    collator = data.make_collator(tokenizer, cfg)
    train_loader = torch.utils.data.DataLoader(train_rows, batch_size=o.micro_batch_per_gpu, shuffle=True,
                                               collate_fn=collator, num_workers=cfg.performance.num_workers,
                                               pin_memory=cfg.performance.pin_memory)
    model = modeling.load_model(cfg, accelerator.device)
    modeling.check_audit(modeling.audit_model(model), cfg)
    model = modeling.prepare_for_training(model, cfg)
    audit = modeling.audit_model(model)
    steps_per_epoch = math.ceil(len(train_rows) / (o.micro_batch_per_gpu * accelerator.num_processes)) // o.grad_accum_steps
    if steps_per_epoch < 1:
        raise data.DataError(f"{cfg.paths.data_path}: {len(train_rows)} training rows do not fill one optimizer step; "
                             f"add data or lower optimization.grad_accum_steps / micro_batch_per_gpu")
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    optimizer, scheduler = training.make_optimizer_and_scheduler(model, cfg, total_steps)

    # ---- accelerate.prepare, and resume ------------------------------------------------------
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    stats = RouterStats(model, accelerator.is_main_process)
    accelerator.register_for_checkpointing(scheduler, stats)
    checkpointer = training.Checkpointer(accelerator, model, tokenizer, cfg, logs, stats, total_steps)
    if resume_path:
        state.update(training.checkpoint_state(resume_path))
        if state["step"] >= total_steps:
            accelerator.print(f"{resume_path} is at step {state['step']} of {total_steps}: the run has already "
                              f"finished. Raise training.max_steps to train further.")
            return 0
    world, tokens_per_step = accelerator.num_processes, o.micro_batch_per_gpu * o.grad_accum_steps * t.max_seq_length
    accelerator.print(f"effective batch: {o.micro_batch_per_gpu} micro x {o.grad_accum_steps} accum x {world} "
                      f"processes = {o.micro_batch_per_gpu * o.grad_accum_steps * world} rows, up to "
                      f"{tokens_per_step * world:,} tokens per optimizer step; {total_steps} steps")
    accelerator.print(modeling.format_audit(audit))
    logs.event("run_start", state["step"], config=cfg.to_dict(), world_size=world, total_steps=total_steps,
               effective_batch=o.micro_batch_per_gpu * o.grad_accum_steps * world,
               tokens_per_step=tokens_per_step * world, model_audit=audit, bad_lines=len(corpus.bad_lines),
               train_rows=len(train_rows), val_rows=len(val_rows), resumed_from=resume_path,
               device=str(accelerator.device), **planned_memory)

    if resume_path:  # last of all, so nothing draws from the random streams it restores
        training.load_checkpoint(accelerator, model, resume_path)
        logs.event("resume", state["step"], from_step=state["step"], checkpoint=resume_path)

    # ---- the loop ---------------------------------------------------------------------------
    preemption = training.Preemption()
    progress = training.progress_bar(accelerator, state["step"], total_steps)
    clock = training.StepClock(state["elapsed_seconds"])
    model.train()
    groups = training.step_groups(train_loader, o.grad_accum_steps, state["epoch"])
    while state["step"] < total_steps:
        # -- step: forward/backward over the micro-batches, token-weighted, then one update
        epoch, group = training.next_group(groups)
        step_tokens, input_tokens = training.count_tokens(group, accelerator)
        loss_total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        for batch in group:
            with accelerator.accumulate(model):
                stats.begin_microbatch(batch["token_mask"])
                loss = training.loss_sum(model, batch)
                # Undo Accelerate's 1/accum and DDP's 1/world: the step's loss is sum / all target tokens.
                accelerator.backward(loss * (world * o.grad_accum_steps) / step_tokens.clamp(min=1))
                stats.commit_microbatch()
                loss_total += loss.detach().double()
                maybe_kill("mid_step", state["step"] + 1)
        step_loss = (accelerator.reduce(loss_total, "sum") / step_tokens.clamp(min=1)).item()
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), o.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        step_loss = training.injected_nan(state["step"] + 1, step_loss)
        if math.isfinite(step_loss) and math.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
            state["nan_skips"] = 0
        else:
            state["nan_skips"] += 1
            logs.event("nan_skipped", state["step"] + 1, loss=step_loss, grad_norm=grad_norm, consecutive=state["nan_skips"])
            training.check_nan_budget(state["nan_skips"], t.max_nan_skips)
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["epoch"] = epoch
        step = state["step"]
        elapsed = clock.tick()
        progress.update(1)

        # -- log
        if step % lg.log_interval == 0 or step == total_steps:
            logs.write("train", step, loss=step_loss, lr=lr, grad_norm=grad_norm, aux_loss=None,
                       epoch=step / steps_per_epoch,
                       tokens=input_tokens, **clock.rates(input_tokens, step, total_steps),
                       elapsed_seconds=elapsed, total_steps=total_steps, **training.gpu_memory())
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if step % lg.expert_stats_interval == 0:
            counts, routed = stats.take(reduce=lambda x: accelerator.reduce(x, "sum"))
            logs.write("experts", step, **stats.record(counts, routed))

        # -- eval
        if step % lg.eval_interval == 0 or step == total_steps:
            training.run_eval(state, step, model, val_rows, collator, accelerator, logs, checkpointer, o.micro_batch_per_gpu)

        # -- checkpoint
        preempted = preemption.requested(accelerator)
        if step % lg.checkpoint_interval == 0 or preempted:
            checkpointer.save(step, training.meta_of(state, elapsed, world))
        clock.exclude_side_work()
        if preempted:
            logs.event("preempted", step, signal=preemption.signal_name or "peer")
            logs.event("run_end", step, status="preempted", final_checkpoint=None)
            accelerator.print(f"preempted by {preemption.signal_name or 'a peer process'}: saved step {step}; "
                              f"continue with ./launch_training.sh (or train_qlora.py --resume)")
            return 0

    # ---- final save ---------------------------------------------------------------------------
    progress.close()
    final = checkpointer.save(state["step"], training.meta_of(state, clock.elapsed(), world), final=True)
    logs.event("run_end", state["step"], status="finished", final_checkpoint=final,
               best_val_loss=state["best_val_loss"], **training.gpu_memory(peak_only=True))
    accelerator.print(f"done: step {state['step']}, best val loss {state['best_val_loss']}, final checkpoint {final}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.plan:
        from glmkit.plan import run_plan_cli

        return run_plan_cli(cfg, args.json)
    from glmkit import training

    accelerator = training.make_accelerator(cfg)
    logs = RunLogs(cfg.logs_dir, enabled=accelerator.is_main_process)
    state = training.fresh_state()
    try:
        status = train(cfg, args, accelerator, logs, state)
        # Tear down the process group while Python is still whole: left to interpreter exit, gloo's
        # threads can abort a clean run (pytorch/pytorch#179291). Only on success: after an error
        # a peer may still sit in a collective, and the teardown would deadlock.
        accelerator.end_training()
        return status
    except training.USER_ERRORS as exc:
        training.close_progress_bars()
        logs.error(exc, state["step"], accelerator.process_index)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        training.close_progress_bars()
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            logs.error(exc, state["step"], accelerator.process_index)
        raise
    finally:
        logs.close()


if __name__ == "__main__":
    sys.exit(main())
