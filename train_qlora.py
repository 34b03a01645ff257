#!/usr/bin/env python3
"""QLoRA continued pre-training of GLM-4.5-Air with Accelerate.

    accelerate launch train_qlora.py --config training_config.yaml [--resume | --resume_from PATH]
    python train_qlora.py --config configs/tiny.yaml          # the CPU demo
    python train_qlora.py --config training_config.yaml --plan [--json]
    python train_qlora.py --config training_config.yaml --prepare-data   # tokenize once, no weights loaded
    python train_qlora.py --config training_config.yaml --inspect-data 3 [--json]   # what the loss trains on

Every expert is NF4, packed documents are kept apart (varlen segments or a block mask), and everything the
dashboard shows is written to <paths.output_dir>/logs/*.jsonl. A step is an optimizer step.

The recipe reads top to bottom: `train` runs the setup phases (each returns what it built), hands the model
to Accelerate, restores a checkpoint if there is one, evaluates the base model, then loops over optimizer
steps (step, log, eval, checkpoint) and saves the final checkpoint. `main` is the process around it: the
config, the output folder's lock, the logs, and one line with exit 2 for every error a user fixes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from glmkit.config.cli import add_config_arguments, config_from_args
from glmkit.config.folders import unwritable_problems
from glmkit.config.schema import HELD_OUT_SET
from glmkit.config.strategy import strategy
from glmkit.data.rows import DataError
from glmkit.model.errors import ModelLoadError
from glmkit.plan.fit import DoesNotFit
from glmkit.run.lock import RunLock, RunLocked
from glmkit.run.logs import RunLogs
from glmkit.run.trackers import require_installed
from glmkit.run.writes import WriteFailed
from glmkit.train.checkpoint import CheckpointError, ResumeError
from glmkit.train.consensus import all_or_none, any_process
from glmkit.train.distributed import (
    LaunchMismatch,
    check_launched_strategy,
    exit_with_parent,
    lost_peer,
    make_accelerator,
)
from glmkit.train.faults import maybe_kill
from glmkit.train.loop_state import LoopState
from glmkit.train.progress import close_progress_bars
from glmkit.train.sequence_parallel import SequenceParallelError

# Errors that a user fixes by changing input: one clear line and exit 2, no traceback.
USER_ERRORS = (ResumeError, CheckpointError, DataError, ModelLoadError, FloatingPointError, DoesNotFit,
               RunLocked, WriteFailed, LaunchMismatch, SequenceParallelError)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    resume.add_argument("--resume_from", metavar="PATH", help="continue from this checkpoint folder")
    parser.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit")
    parser.add_argument("--json", action="store_true",
                        help="with --plan: one JSON object; with --inspect-data: one JSON object per row")
    parser.add_argument("--force", action="store_true", help="start even if the memory plan says it won't fit")
    parser.add_argument("--prepare-data", action="store_true",
                        help="tokenize and pack paths.data_path into the cache (no model weights), print a summary, exit")
    parser.add_argument("--inspect-data", type=int, metavar="N",
                        help="print the first N prepared training rows with the trained tokens marked (no weights), exit")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: continue even though the data differs from the checkpoint's fingerprint")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# Setup phases: each builds one part of the run and returns it
# ---------------------------------------------------------------------------

@dataclass
class RunData:
    """What the run reads: the tokenizer, the prepared corpus, the training loader, every eval set's rows."""
    tokenizer: object
    corpus: object                # glmkit.data.prepare.PreparedData: rows, summary, fingerprint
    collator: object
    train_loader: torch.utils.data.DataLoader
    eval_rows: dict               # {set name: rows}: the held-out split `val`, then eval.sets (empty ones left out)
    steps_per_epoch: int
    total_steps: int
    layout: object                # glmkit.train.sequence_parallel.SequenceParallel: whose rows, which slice of them


@dataclass
class RunModel:
    """The 4-bit base with its adapter, as every process holds it before Accelerate wraps it."""
    model: torch.nn.Module
    audit: dict                   # what was quantized and what trains (glmkit/model/load.py: audit_model)
    loaded: object                # glmkit.model.sharded_load.ShardedLoad under fsdp on several processes, else None


def setup_data(cfg, accelerator, logs, resume_path: str | None, allow_data_change: bool, layout) -> RunData:
    """Tokenize (or map the cached) corpus on every process, and lay it out in micro-batches of rows, dealt
    among the processes (among groups of them under sequence parallelism: `layout`)."""
    from transformers import AutoTokenizer

    from glmkit.data.prepare import prepare_for_run
    from glmkit.data.rows import make_collator

    opt = cfg.optimization
    tokenizer = AutoTokenizer.from_pretrained(cfg.paths.model_dir)
    corpus = all_or_none(accelerator, prepare_for_run, cfg, tokenizer, accelerator, logs, resume_path,
                         allow_data_change, errors=USER_ERRORS,
                         elsewhere=WriteFailed("another process could not prepare the data (its message says why)"))
    sets = [(HELD_OUT_SET, corpus.val_rows)] + [(s.name, s.rows) for s in corpus.eval_sets]
    eval_rows = {name: rows for name, rows in sets if len(rows)}
    collator = make_collator(tokenizer, cfg)
    train_loader = torch.utils.data.DataLoader(corpus.train_rows, batch_size=opt.micro_batch_per_gpu, shuffle=True,
                                               collate_fn=collator, num_workers=cfg.performance.num_workers,
                                               pin_memory=cfg.performance.pin_memory)
    steps_per_epoch = (math.ceil(len(corpus.train_rows) / (opt.micro_batch_per_gpu * layout.data_groups))
                       // opt.grad_accum_steps)
    if steps_per_epoch < 1:
        raise DataError(f"{cfg.paths.data_path}: {len(corpus.train_rows)} training rows do not fill one optimizer "
                        f"step; add data or lower optimization.grad_accum_steps / micro_batch_per_gpu")
    total_steps = cfg.training.max_steps or cfg.training.epochs * steps_per_epoch
    return RunData(tokenizer, corpus, collator, train_loader, eval_rows, steps_per_epoch, total_steps, layout)


def setup_model(cfg, accelerator) -> RunModel:
    """Stream the checkpoint into 4-bit, add the adapter, and (fsdp on several processes) shard it."""
    from glmkit.model.load import audit_model, check_audit, load_model, prepare_for_training
    from glmkit.model.sharded_load import ShardedLoad
    from glmkit.train.fsdp import STRATEGY as FSDP
    from glmkit.train.fsdp import shard_model

    world = accelerator.num_processes
    # fsdp on several processes: each keeps only its rows of every 4-bit tensor from the moment it is quantized
    loaded = ShardedLoad(accelerator.process_index, world) if strategy(cfg) == FSDP and world > 1 else None
    model = load_model(cfg, accelerator.device, shard=loaded)
    check_audit(audit_model(model), cfg)
    with loaded.shape_stand_ins() if loaded else nullcontext():
        model = prepare_for_training(model, cfg)
    audit = audit_model(model)
    if loaded is not None:  # before the optimizer, which then holds AdamW moments for this rank's shards only
        model = shard_model(model, accelerator.device, loaded)
    return RunModel(model, audit, loaded)


def prepare_with_accelerate(cfg, accelerator, model, optimizer, data: RunData):
    """Hand the parts to Accelerate: (model, optimizer, train_loader) as the loop uses them."""
    from glmkit.train.ddp import exclude_frozen_from_sync
    from glmkit.train.fsdp import STRATEGY as FSDP
    from glmkit.train.sequence_parallel import deal_among_groups

    train_loader = deal_among_groups(accelerator, data.train_loader, data.layout)  # P = 1: left to prepare

    if strategy(cfg) == FSDP:  # the data loader only: the model is sharded already; the optimizer is saved by DCP
        return model, optimizer, accelerator.prepare(train_loader)
    exclude_frozen_from_sync(model)  # every rank loaded the 4-bit base itself: DDP syncs LoRA only
    return accelerator.prepare(model, optimizer, train_loader)


def restore_checkpoint(accelerator, cfg, path: str, model, optimizer, scheduler, train_loader, sharded_state) -> None:
    """Optimizer, scheduler, RNG streams, data position and LoRA weights as the checkpoint holds them."""
    from glmkit.train.checkpoint import load_checkpoint, saved_grad_accum
    from glmkit.train.optim import apply_current_hyperparameters
    from glmkit.train.world_size import restore_data_position

    load_checkpoint(accelerator, model, path, sharded_state)
    saved_accum = saved_grad_accum(path)
    if saved_accum != cfg.optimization.grad_accum_steps:  # another world size: the same steps, other micro-batches
        restore_data_position(train_loader, path, saved_accum, cfg.optimization.grad_accum_steps)
    apply_current_hyperparameters(optimizer, scheduler, cfg)


def run_eval(step: int, model, data: RunData, accelerator, cfg, logs, state: LoopState) -> LoopState:
    """Every eval set once: a bar while it runs, a console line with each set's loss and its change since step 0,
    the records in eval_log.jsonl and events_log.jsonl. Returns the loop state that has seen it."""
    import time

    from glmkit.train.evaluation import batches_here, eval_line, eval_record, evaluate_sets
    from glmkit.train.progress import console, eval_bar

    started = time.time()
    micro_batch = cfg.optimization.micro_batch_per_gpu
    total = sum(batches_here(rows, data.layout, micro_batch) for rows in data.eval_rows.values())
    with eval_bar(accelerator, step, total) as bar:
        results = evaluate_sets(model, data.eval_rows, data.collator, accelerator, micro_batch,
                                on_batch=lambda name: bar.set_description(f"eval {name}", refresh=False) or bar.update(),
                                layout=data.layout)
    record = eval_record(results, cfg.eval.select_by)
    losses = {name: r.val_loss for name, r in results.items()}
    logs.write("eval", step, **record)
    logs.event("eval", step, val_loss=record["val_loss"], perplexity=record["perplexity"], losses=losses,
               **({"baseline": True} if step == 0 else {}))
    state = state.after_eval(step, losses, record["val_loss"])
    acceptance = {name: r.mtp_acceptance for name, r in results.items() if r.mtp_acceptance is not None}
    console(accelerator, eval_line(step, losses, state.baseline_losses, time.time() - started, acceptance))
    return state


# ---------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------

def train(cfg, args, accelerator, logs) -> int:
    from glmkit.model.load import check_activation_offload, check_model_dir, format_audit, is_demo_model
    from glmkit.plan.fit import memory_gate
    from glmkit.run.trackers import start_trackers
    from glmkit.train.checkpoint import (
        Checkpointer,
        check_best_adapter_dir,
        checkpoint_state,
        decide_resume,
        recover_best_adapter,
        run_finished,
    )
    from glmkit.train.ddp import sync_report
    from glmkit.train.distributed import check_shared_output_dir
    from glmkit.train.evaluation import adapter_is_finite, improves
    from glmkit.train.fsdp import STRATEGY as FSDP
    from glmkit.train.fsdp import ShardedState, resident_bytes_by_rank
    from glmkit.train.optim import make_optimizer_and_scheduler
    from glmkit.train.preemption import Preemption
    from glmkit.train.progress import StepClock, gpu_memory, progress_bar
    from glmkit.train.router_stats import RouterStats
    from glmkit.train.sequence_parallel import setup_sequence_parallel
    from glmkit.train.step import check_nan_budget, mtp_fields, next_group, step_groups, train_step
    from glmkit.train.summary import run_summary

    # ---- setup: checks that cost seconds, then where to start, data, model, optimizer ------------------------
    torch.manual_seed(cfg.training.seed)
    check_shared_output_dir(accelerator, cfg.paths.output_dir)
    resume = decide_resume(cfg, accelerator, args.resume, args.resume_from)
    if resume.grad_accum_steps != cfg.optimization.grad_accum_steps:  # resumed on another world size
        cfg = replace(cfg, optimization=replace(cfg.optimization, grad_accum_steps=resume.grad_accum_steps))
    accelerator.gradient_accumulation_steps = cfg.optimization.grad_accum_steps
    if accelerator.is_main_process and (restored := recover_best_adapter(cfg.paths.best_adapter_dir)):
        accelerator.print(f"restored {cfg.paths.best_adapter_dir} from {restored} (a kill interrupted its swap)")
    check_best_adapter_dir(cfg.paths.best_adapter_dir)
    planned_memory = memory_gate(cfg, accelerator, args.force)  # first: priced on the meta device, nothing allocated
    check_model_dir(cfg)
    check_activation_offload(cfg, accelerator.device)
    layout = setup_sequence_parallel(cfg, accelerator)  # distributed.sequence_parallel: who shares which rows
    data = setup_data(cfg, accelerator, logs, resume.path, args.allow_data_change, layout)
    built = setup_model(cfg, accelerator)
    optimizer, scheduler = make_optimizer_and_scheduler(built.model, cfg, data.total_steps)

    # ---- accelerate.prepare, the checkpointer, and the loop's starting state ------------------------------------
    model, optimizer, train_loader = prepare_with_accelerate(cfg, accelerator, built.model, optimizer, data)
    stats = RouterStats(model, accelerator.is_main_process)
    accelerator.register_for_checkpointing(scheduler, stats)
    sharded_state = ShardedState(model, optimizer) if strategy(cfg) == FSDP else None
    checkpointer = Checkpointer(accelerator, model, data.tokenizer, cfg, logs, stats, data.total_steps,
                                data.corpus.fingerprint, sharded_state)
    state = (checkpoint_state(resume.path) if resume.path else LoopState()).selecting_by(cfg.eval.select_by,
                                                                                          data.corpus.changed_sets)
    total_steps, world = data.total_steps, accelerator.num_processes
    # A checkpoint of the last step that is not the final one (stopped before its final save) is finished below.
    if run_finished(resume.path, state.step, total_steps):
        accelerator.print(f"{resume.path} is at step {state.step} of {total_steps}: the run has already "
                          f"finished. Raise training.max_steps to train further.")
        return 0
    rows_per_step = cfg.optimization.micro_batch_per_gpu * cfg.optimization.grad_accum_steps * layout.data_groups
    tokens_per_step = rows_per_step * cfg.training.max_seq_length
    shared = f"{layout.data_groups} group" + ("s" if layout.data_groups > 1 else "") + f" of {layout.size} processes"
    dealt = f"{world} processes" if layout.size == 1 else shared
    accelerator.print(f"effective batch: {cfg.optimization.micro_batch_per_gpu} micro x "
                      f"{cfg.optimization.grad_accum_steps} accum x {dealt} = {rows_per_step} rows, up to "
                      f"{tokens_per_step:,} tokens per optimizer step; {total_steps} steps")
    accelerator.print(format_audit(built.audit))
    # From run_start on, SIGTERM, SIGINT and SIGHUP (a hung-up terminal) end the run at a step boundary, saved and
    # logged (`preempted`, `run_end`). Before it nothing is lost: every write so far is atomic, or a finished cache.
    preemption = Preemption()
    if accelerator.is_main_process:  # from here on every JSONL record also goes to logging.report_to
        logs.trackers = start_trackers(cfg, state.step, state.tracker_runs, logs, world)
        state = replace(state, tracker_runs=logs.trackers.runs)
    corpus = data.corpus
    logs.event("run_start", state.step, config=cfg.to_dict(), world_size=world, total_steps=total_steps,
               effective_batch=rows_per_step, tokens_per_step=tokens_per_step, model_audit=built.audit,
               bad_lines=corpus.bad_line_count, train_rows=len(corpus.train_rows), val_rows=len(corpus.val_rows),
               chat=corpus.chat_counts, eval_sets={name: len(rows) for name, rows in data.eval_rows.items()},
               resumed_from=resume.path, device=str(accelerator.device), ddp_sync=sync_report(model),
               strategy=strategy(cfg), resident_by_rank=resident_bytes_by_rank(model, accelerator, built.loaded),
               demo_model=is_demo_model(cfg.paths.model_dir), **planned_memory)
    if resume.path:  # last of all, so nothing draws from the random streams it restores
        restore_checkpoint(accelerator, cfg, resume.path, model, optimizer, scheduler, train_loader, sharded_state)
        logs.event("resume", state.step, from_step=state.step, checkpoint=resume.path)

    # ---- the baseline: every eval set before the first update (the base model: LoRA B starts at 0) -------------
    if cfg.eval.at_start and state.step == 0 and data.eval_rows:
        state = run_eval(0, model, data, accelerator, cfg, logs, state)

    # ---- the loop ----------------------------------------------------------------------------------------------
    progress = progress_bar(accelerator, state.step, total_steps)
    clock = StepClock(state.elapsed_seconds)
    model.train()
    groups = step_groups(train_loader, cfg.optimization.grad_accum_steps, state.epoch, layout)
    while state.step < total_steps:
        # -- step: forward/backward over the micro-batches, token-weighted, then one update
        epoch, group = next_group(groups)
        result = train_step(model, group, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler,
                            stats=stats, max_grad_norm=cfg.optimization.max_grad_norm, step=state.step + 1,
                            mtp=cfg.mtp)
        state = replace(state, step=state.step + 1, epoch=epoch, tokens_seen=state.tokens_seen + result.input_tokens,
                        trained_tokens_seen=state.trained_tokens_seen + result.trained_tokens,
                        nan_skips=0 if result.applied else state.nan_skips + 1, elapsed_seconds=clock.tick())
        step = state.step
        progress.update(1)
        if not result.applied:
            logs.event("nan_skipped", step, loss=result.loss, grad_norm=result.grad_norm, consecutive=state.nan_skips)
            check_nan_budget(state.nan_skips, cfg.training.max_nan_skips)

        # -- log
        if step % cfg.logging.log_interval == 0 or step == total_steps:
            logs.write("train", step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm, aux_loss=None,
                       epoch=step / data.steps_per_epoch, tokens=result.input_tokens, tokens_seen=state.tokens_seen,
                       trained_tokens=result.trained_tokens, trained_tokens_seen=state.trained_tokens_seen,
                       **clock.rates(result.input_tokens, step, total_steps), elapsed_seconds=state.elapsed_seconds,
                       total_steps=total_steps, **gpu_memory(), **mtp_fields(result))
            progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
        if step % cfg.logging.expert_stats_interval == 0:
            counts, routed = stats.take(reduce=lambda x: accelerator.reduce(x, "sum"))
            logs.write("experts", step, **stats.record(counts, routed))

        # -- eval of every set; the selection set's loss picks the best adapter and ranks checkpoints
        if (step % cfg.logging.eval_interval == 0 or step == total_steps) and data.eval_rows:
            state = run_eval(step, model, data, accelerator, cfg, logs, state)
            selected = state.last_val_loss
            maybe_kill("after_eval", step)
            if improves(selected, state.best_val_loss) and adapter_is_finite(model):
                checkpointer.save_best_adapter(step, selected, state.best_val_loss, cfg.eval.select_by)
                state = replace(state, best_val_loss=selected, best_step=step)

        # -- a log the main process could not write (a full disk) stops every process here, together
        if any_process(accelerator, logs.failed is not None):
            raise logs.failed or WriteFailed("the main process could not write the run logs (its message says why)")

        # -- checkpoint, and preemption; a signal at the last step finishes the run: the final save is next
        asked = preemption.requested(accelerator)
        preempted = asked and step < total_steps
        if asked and not preempted:
            accelerator.print(f"{preemption.signal_name or 'a peer process'} at the last step: finishing the run")
        if (step % cfg.checkpoint.interval == 0 and step < total_steps) or preempted:
            checkpointer.save(state)
        clock.exclude_side_work()
        if preempted:
            logs.event("preempted", step, signal=preemption.signal_name or "peer")
            logs.event("run_end", step, status="preempted", final_checkpoint=None)
            accelerator.print(f"preempted by {preemption.signal_name or 'a peer process'}: saved step {step}; "
                              f"continue with ./launch_training.sh (or train_qlora.py --resume)")
            return 0

    # ---- final save --------------------------------------------------------------------------------------------
    progress.close()
    final = checkpointer.save(replace(state, elapsed_seconds=clock.elapsed()), final=True)
    logs.event("run_end", state.step, status="finished", final_checkpoint=final, best_val_loss=state.best_val_loss,
               tokens_seen=state.tokens_seen, trained_tokens_seen=state.trained_tokens_seen, **gpu_memory(peak_only=True))
    accelerator.print(run_summary(replace(state, elapsed_seconds=clock.elapsed()), config_path=cfg.source_path,
                                  best_adapter_dir=cfg.paths.best_adapter_dir, final_checkpoint=final,
                                  select_by=cfg.eval.select_by, best_adapter_written=state.best_step is not None))
    return 0


# ---------------------------------------------------------------------------
# The process: config, lock, logs, and the exit status
# ---------------------------------------------------------------------------

def lock_output_dir(cfg, accelerator) -> RunLock:
    """Take the output folder's lock on the main process; every process stops if it is held elsewhere."""
    lock, refused = RunLock(cfg.paths.output_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunLocked as exc:
            refused = exc
    if any_process(accelerator, refused is not None):
        raise refused or RunLocked(f"paths.output_dir {cfg.paths.output_dir} is in use by another trainer")
    return lock


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.plan:
        from glmkit.plan.fit import run_plan_cli

        return run_plan_cli(cfg, args.json)
    # Every folder this command writes, checked before anything starts (each process checks the same).
    data_only = args.prepare_data or args.inspect_data is not None
    problems = unwritable_problems(cfg, ("scratch_dir",) if data_only else
                                   ("output_dir", "best_adapter_dir", "scratch_dir"))
    if problems:
        print("\n".join(f"error: {problem}" for problem in problems), file=sys.stderr)
        return 2
    if args.prepare_data:
        from glmkit.data.prepare import run_prepare_cli

        return run_prepare_cli(cfg)
    if args.inspect_data is not None:
        from glmkit.data.inspect_rows import run_inspect_cli

        return run_inspect_cli(cfg, args.inspect_data, args.json)
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
