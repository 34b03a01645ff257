#!/usr/bin/env python3
"""QLoRA continued pre-training of GLM-4.5-Air with Accelerate.

    accelerate launch train_qlora.py --config training_config.yaml [--resume | --resume_from PATH]
    python train_qlora.py --config configs/tiny.yaml          # the CPU demo
    python train_qlora.py --config training_config.yaml --plan [--json]
    python train_qlora.py --config training_config.yaml --prepare-data   # tokenize once, no weights loaded

Every expert is NF4, packed documents are kept apart (varlen segments or a block mask), and everything the
dashboard shows is written to <paths.output_dir>/logs/*.jsonl. A step is an optimizer step.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import replace

import torch

from glmkit.config.folders import unwritable_problems
from glmkit.config.schema import HELD_OUT_SET, add_config_arguments, config_from_args, strategy
from glmkit.data.rows import DataError
from glmkit.model.errors import ModelLoadError
from glmkit.plan.fit import DoesNotFit
from glmkit.run.lock import RunLock, RunLocked
from glmkit.run.logs import RunLogs
from glmkit.run.trackers import require_installed
from glmkit.run.writes import WriteFailed
from glmkit.train import checkpoint as ckpt
from glmkit.train.distributed import (
    LaunchMismatch,
    agree,
    check_launched_strategy,
    check_shared_output_dir,
    exit_with_parent,
    lost_peer,
    make_accelerator,
)
from glmkit.train.faults import maybe_kill
from glmkit.train.loop_state import LoopState
from glmkit.train.progress import close_progress_bars

# Errors that a user fixes by changing input: one clear line and exit 2, no traceback.
USER_ERRORS = (ckpt.ResumeError, ckpt.CheckpointError, DataError, ModelLoadError, FloatingPointError, DoesNotFit,
               RunLocked, WriteFailed, LaunchMismatch)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    resume.add_argument("--resume_from", metavar="PATH", help="continue from this checkpoint folder")
    parser.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit")
    parser.add_argument("--json", action="store_true", help="with --plan: one JSON object")
    parser.add_argument("--force", action="store_true", help="start even if the memory plan says it won't fit")
    parser.add_argument("--prepare-data", action="store_true",
                        help="tokenize and pack paths.data_path into the cache (no model weights), print a summary, exit")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: continue even though the data differs from the checkpoint's fingerprint")
    return parser.parse_args(argv)


def lock_output_dir(cfg, accelerator) -> RunLock:
    """Take the output folder's lock on the main process; every process stops if it is held elsewhere."""
    lock, refused = RunLock(cfg.paths.output_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunLocked as exc:
            refused = exc
    if agree(accelerator, refused is not None):
        raise refused or RunLocked(f"paths.output_dir {cfg.paths.output_dir} is in use by another trainer")
    return lock


def all_or_none(accelerator, work, *args):
    """work(*args) on every process; if it failed with a user error anywhere, every process raises one."""
    result, error = None, None
    try:
        result = work(*args)
    except USER_ERRORS as exc:
        error = exc
    if agree(accelerator, error is not None):
        raise error or WriteFailed("another process could not prepare the data (its message says why)")
    return result


def train(cfg, args, accelerator, logs) -> int:
    from transformers import AutoTokenizer

    from glmkit.data import prepare
    from glmkit.data import rows as data
    from glmkit.model import load as modeling
    from glmkit.model.sharded_load import ShardedLoad
    from glmkit.plan.fit import memory_gate
    from glmkit.run.trackers import start_trackers
    from glmkit.train import ddp, fsdp, world_size
    from glmkit.train.evaluation import adapter_is_finite, eval_record, evaluate_sets, improves
    from glmkit.train.optim import apply_current_hyperparameters, make_optimizer_and_scheduler
    from glmkit.train.preemption import Preemption
    from glmkit.train.progress import StepClock, gpu_memory, progress_bar
    from glmkit.train.router_stats import RouterStats
    from glmkit.train.step import check_nan_budget, next_group, step_groups, train_step

    # ---- setup: checks, data, model, optimizer ---------------------------------------------
    t, o, lg, ev_cfg = cfg.training, cfg.optimization, cfg.logging, cfg.eval
    torch.manual_seed(t.seed)
    check_shared_output_dir(accelerator, cfg.paths.output_dir)
    resume_path = ckpt.resume_checkpoint(cfg, args, accelerator)  # on a new world size: sets grad_accum_steps
    accelerator.gradient_accumulation_steps = o.grad_accum_steps
    if accelerator.is_main_process and (restored := ckpt.recover_best_adapter(cfg.paths.best_adapter_dir)):
        accelerator.print(f"restored {cfg.paths.best_adapter_dir} from {restored} (a kill interrupted its swap)")
    ckpt.check_best_adapter_dir(cfg.paths.best_adapter_dir)
    planned_memory = memory_gate(cfg, accelerator, args.force)  # first: priced on the meta device, nothing allocated
    modeling.check_model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.paths.model_dir)
    corpus = all_or_none(accelerator, prepare.prepare_for_run, cfg, tokenizer, accelerator, logs, resume_path,
                         args.allow_data_change)
    train_rows, val_rows = corpus.train_rows, corpus.val_rows
    eval_rows = {name: rows for name, rows in [(HELD_OUT_SET, val_rows)] + [(s.name, s.rows) for s in corpus.eval_sets]
                 if len(rows)}  # every set an eval measures: the held-out split, then eval.sets
    collator = data.make_collator(tokenizer, cfg)
    train_loader = torch.utils.data.DataLoader(train_rows, batch_size=o.micro_batch_per_gpu, shuffle=True,
                                               collate_fn=collator, num_workers=cfg.performance.num_workers,
                                               pin_memory=cfg.performance.pin_memory)
    world = accelerator.num_processes
    sharded = strategy(cfg) == fsdp.STRATEGY
    # fsdp on several processes: each keeps only its rows of every 4-bit tensor from the moment it is quantized
    loaded = ShardedLoad(accelerator.process_index, world) if sharded and world > 1 else None
    model = modeling.load_model(cfg, accelerator.device, shard=loaded)
    modeling.check_audit(modeling.audit_model(model), cfg)
    with loaded.shape_stand_ins() if loaded else nullcontext():
        model = modeling.prepare_for_training(model, cfg)
    audit = modeling.audit_model(model)
    steps_per_epoch = math.ceil(len(train_rows) / (o.micro_batch_per_gpu * world)) // o.grad_accum_steps
    if steps_per_epoch < 1:
        raise data.DataError(f"{cfg.paths.data_path}: {len(train_rows)} training rows do not fill one optimizer step; "
                             f"add data or lower optimization.grad_accum_steps / micro_batch_per_gpu")
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    if loaded is not None:  # before the optimizer, which then holds AdamW moments for this rank's shards only
        model = fsdp.shard_model(model, accelerator.device, loaded)
    optimizer, scheduler = make_optimizer_and_scheduler(model, cfg, total_steps)

    # ---- accelerate.prepare, and resume -----------------------------------------------------
    if sharded:  # the data loader only: the model is sharded already, the checkpointer saves the optimizer (DCP)
        train_loader = accelerator.prepare(train_loader)
    else:
        ddp.exclude_frozen_from_sync(model)  # every rank loaded the 4-bit base itself: DDP syncs LoRA only
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    stats = RouterStats(model, accelerator.is_main_process)
    accelerator.register_for_checkpointing(scheduler, stats)
    sharded_state = fsdp.ShardedState(model, optimizer) if sharded else None
    checkpointer = ckpt.Checkpointer(accelerator, model, tokenizer, cfg, logs, stats, total_steps, corpus.fingerprint,
                                     sharded_state)
    state = (ckpt.checkpoint_state(resume_path) if resume_path else LoopState()).selecting_by(ev_cfg.select_by,
                                                                                              corpus.changed_sets)
    # A checkpoint of the last step that is not the final one (stopped before its final save) is finished below.
    if ckpt.run_finished(resume_path, state.step, total_steps):
        accelerator.print(f"{resume_path} is at step {state.step} of {total_steps}: the run has already "
                          f"finished. Raise training.max_steps to train further.")
        return 0
    rows_per_step = o.micro_batch_per_gpu * o.grad_accum_steps * world
    accelerator.print(f"effective batch: {o.micro_batch_per_gpu} micro x {o.grad_accum_steps} accum x {world} "
                      f"processes = {rows_per_step} rows, up to {rows_per_step * t.max_seq_length:,} tokens per "
                      f"optimizer step; {total_steps} steps")
    accelerator.print(modeling.format_audit(audit))
    # From run_start on, SIGTERM, SIGINT and SIGHUP (a hung-up terminal) end the run at a step boundary, saved and
    # logged (`preempted`, `run_end`). Before it nothing is lost: every write so far is atomic, or a finished cache.
    preemption = Preemption()
    if accelerator.is_main_process:  # from here on every JSONL record also goes to logging.report_to
        logs.trackers = start_trackers(cfg, state.step, state.tracker_runs, logs, world)
        state = replace(state, tracker_runs=logs.trackers.runs)
    logs.event("run_start", state.step, config=cfg.to_dict(), world_size=world, total_steps=total_steps,
               effective_batch=rows_per_step, tokens_per_step=rows_per_step * t.max_seq_length, model_audit=audit,
               bad_lines=corpus.bad_line_count, train_rows=len(train_rows), val_rows=len(val_rows),
               eval_sets={name: len(rows) for name, rows in eval_rows.items()},
               resumed_from=resume_path, device=str(accelerator.device), ddp_sync=ddp.sync_report(model),
               strategy="fsdp" if sharded else "ddp", resident_by_rank=fsdp.resident_bytes_by_rank(model, accelerator, loaded),
               **planned_memory)
    if resume_path:  # last of all, so nothing draws from the random streams it restores
        ckpt.load_checkpoint(accelerator, model, resume_path, sharded_state)
        saved_accum = ckpt.saved_grad_accum(resume_path)
        if saved_accum != o.grad_accum_steps:  # another world size: the same steps drawn, in micro-batches of it
            world_size.restore_data_position(train_loader, resume_path, saved_accum, o.grad_accum_steps)
        apply_current_hyperparameters(optimizer, scheduler, cfg)
        logs.event("resume", state.step, from_step=state.step, checkpoint=resume_path)

    # ---- the baseline: every eval set before the first update (the base model: LoRA B starts at 0)
    if ev_cfg.at_start and state.step == 0 and eval_rows:
        ev = evaluate_sets(model, eval_rows, collator, accelerator, o.micro_batch_per_gpu)
        record = eval_record(ev, ev_cfg.select_by)
        logs.write("eval", 0, **record)
        logs.event("eval", 0, val_loss=record["val_loss"], perplexity=record["perplexity"],
                   losses={name: r.val_loss for name, r in ev.items()}, baseline=True)

    # ---- the loop -----------------------------------------------------------------------------
    progress = progress_bar(accelerator, state.step, total_steps)
    clock = StepClock(state.elapsed_seconds)
    model.train()
    groups = step_groups(train_loader, o.grad_accum_steps, state.epoch)
    while state.step < total_steps:
        # -- step: forward/backward over the micro-batches, token-weighted, then one update
        epoch, group = next_group(groups)
        result = train_step(model, group, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler,
                            stats=stats, max_grad_norm=o.max_grad_norm, step=state.step + 1)
        state = replace(state, step=state.step + 1, epoch=epoch, tokens_seen=state.tokens_seen + result.input_tokens,
                        nan_skips=0 if result.applied else state.nan_skips + 1, elapsed_seconds=clock.tick())
        step = state.step
        progress.update(1)
        if not result.applied:
            logs.event("nan_skipped", step, loss=result.loss, grad_norm=result.grad_norm, consecutive=state.nan_skips)
            check_nan_budget(state.nan_skips, t.max_nan_skips)

        # -- log
        if step % lg.log_interval == 0 or step == total_steps:
            logs.write("train", step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm, aux_loss=None,
                       epoch=step / steps_per_epoch, tokens=result.input_tokens, tokens_seen=state.tokens_seen,
                       **clock.rates(result.input_tokens, step, total_steps), elapsed_seconds=state.elapsed_seconds,
                       total_steps=total_steps, **gpu_memory())
            progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
        if step % lg.expert_stats_interval == 0:
            counts, routed = stats.take(reduce=lambda x: accelerator.reduce(x, "sum"))
            logs.write("experts", step, **stats.record(counts, routed))

        # -- eval of every set; the selection set's loss picks the best adapter and ranks checkpoints
        if (step % lg.eval_interval == 0 or step == total_steps) and eval_rows:
            ev = evaluate_sets(model, eval_rows, collator, accelerator, o.micro_batch_per_gpu)
            record = eval_record(ev, ev_cfg.select_by)
            logs.write("eval", step, **record)
            logs.event("eval", step, val_loss=record["val_loss"], perplexity=record["perplexity"],
                       losses={name: r.val_loss for name, r in ev.items()})
            selected = record["val_loss"]
            state = replace(state, last_val_loss=selected, last_eval_step=step)
            maybe_kill("after_eval", step)
            if improves(selected, state.best_val_loss) and adapter_is_finite(model):
                checkpointer.save_best_adapter(step, selected, state.best_val_loss, ev_cfg.select_by)
                state = replace(state, best_val_loss=selected, best_step=step)

        # -- a log the main process could not write (a full disk) stops every process here, together
        if agree(accelerator, logs.failed is not None):
            raise logs.failed or WriteFailed("the main process could not write the run logs (its message says why)")

        # -- checkpoint, and preemption (asked at the last step, the run finishes: the final save is next)
        asked = preemption.requested(accelerator)
        preempted = asked and step < total_steps
        if asked and not preempted:
            accelerator.print(f"{preemption.signal_name or 'a peer process'} at the last step: finishing the run")
        if step % lg.checkpoint_interval == 0 or preempted:
            checkpointer.save(state)
        clock.exclude_side_work()
        if preempted:
            logs.event("preempted", step, signal=preemption.signal_name or "peer")
            logs.event("run_end", step, status="preempted", final_checkpoint=None)
            accelerator.print(f"preempted by {preemption.signal_name or 'a peer process'}: saved step {step}; "
                              f"continue with ./launch_training.sh (or train_qlora.py --resume)")
            return 0

    # ---- final save -----------------------------------------------------------------------------
    progress.close()
    final = checkpointer.save(replace(state, elapsed_seconds=clock.elapsed()), final=True)
    logs.event("run_end", state.step, status="finished", final_checkpoint=final, best_val_loss=state.best_val_loss,
               tokens_seen=state.tokens_seen, **gpu_memory(peak_only=True))
    accelerator.print(f"done: step {state.step}, best val loss {state.best_val_loss}, final checkpoint {final}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.plan:
        from glmkit.plan.fit import run_plan_cli

        return run_plan_cli(cfg, args.json)
    # Every folder this command writes, checked before anything starts (each process checks the same).
    problems = unwritable_problems(cfg, ("scratch_dir",) if args.prepare_data else
                                   ("output_dir", "best_adapter_dir", "scratch_dir"))
    if problems:
        print("\n".join(f"error: {problem}" for problem in problems), file=sys.stderr)
        return 2
    if args.prepare_data:
        from glmkit.data.prepare import run_prepare_cli

        return run_prepare_cli(cfg)
    require_installed(cfg)
    exit_with_parent()
    accelerator = make_accelerator(cfg)
    # Nothing goes into the logs folder before this run holds its lock: they may be a running run's logs.
    logs = RunLogs(cfg.logs_dir, enabled=False)
    lock = RunLock(cfg.paths.output_dir)
    try:
        lock = lock_output_dir(cfg, accelerator)
        logs = RunLogs(cfg.logs_dir, enabled=accelerator.is_main_process)
        check_launched_strategy(cfg, accelerator)
        status = train(cfg, args, accelerator, logs)
        # Tear down the process group while Python is still whole: left to interpreter exit, gloo's
        # threads can abort a clean run (pytorch/pytorch#179291). Only on success: after an error
        # a peer may still sit in a collective, and the teardown would deadlock.
        accelerator.end_training()
        return status
    except USER_ERRORS as exc:
        close_progress_bars()
        if not isinstance(exc, RunLocked):  # the logs belong to the run that holds the lock: leave them alone
            logs.error(exc, None, accelerator.process_index)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        close_progress_bars()
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            logs.error(exc, None, accelerator.process_index)
        if line := lost_peer(exc, accelerator, cfg.paths.output_dir):  # a peer killed: the kit's line, no traceback
            print(f"error: {line}", file=sys.stderr)
            return 1
        raise
    finally:
        logs.close()
        lock.release()


if __name__ == "__main__":
    exit_status = main()
    if exit_status != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A refusal in a multi-process run cannot tear the process group down (a peer may still sit in a
        # collective), and left to interpreter exit gloo's threads can abort the process (SIGABRT, exit 134,
        # instead of the 2 the launcher reports). The logs and the lock are closed by now: leave without
        # running C++ destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_status)
    sys.exit(exit_status)
