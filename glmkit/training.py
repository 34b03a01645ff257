"""Pieces of the training loop that would clutter train_qlora.py: schedule, loss, eval, batching,
checkpoint orchestration, preemption. The loop itself stays in train_qlora.py, top to bottom.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from itertools import islice

import torch
import torch.nn.functional as F

from glmkit import checkpoint as ckpt
from glmkit.faults import maybe_fail_write, maybe_kill, unshared_view
from glmkit.data import IGNORE_INDEX, DataError, model_inputs
from glmkit.model import ModelLoadError


# ---------------------------------------------------------------------------
# Schedule: warmup, then cosine / linear decay to a floor, or constant.
# ---------------------------------------------------------------------------

def lr_lambda(kind: str, warmup: int, total: int, floor: float):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * shape
    return factor


def make_optimizer_and_scheduler(model, cfg, total_steps: int):
    o = cfg.optimization
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                  eps=o.adam_epsilon, weight_decay=o.weight_decay)
    schedule = lr_lambda(o.lr_scheduler, o.warmup_steps, total_steps, o.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ---------------------------------------------------------------------------
# Loss: summed over target tokens, so a step's loss is token-weighted across
# micro-batches and processes (a mean of means would overweight short batches).
# ---------------------------------------------------------------------------

def loss_sum(model, batch: dict) -> torch.Tensor:
    logits = model(**model_inputs(batch), use_cache=False).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def target_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(group: list[dict], accelerator) -> tuple[torch.Tensor, int]:
    """(target tokens, non-pad input tokens) of a step's micro-batches, summed over processes in one reduce."""
    counts = torch.tensor([[target_tokens(b), int(b["token_mask"].sum())] for b in group], device=accelerator.device)
    totals = accelerator.reduce(counts.sum(dim=0), "sum")
    return totals[0], int(totals[1].item())


def step_groups(loader, grad_accum: int, epoch: int):
    """Yield (epoch, [micro-batches]) forever; an epoch's incomplete last group is dropped."""
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = iter(loader)
        while len(group := list(islice(batches, grad_accum))) == grad_accum:
            yield epoch, group
        epoch += 1


def next_group(groups):
    """The next step's micro-batches, drawn without touching the global torch RNG.

    Loading draws random numbers (iterator seeds, Accelerate's RNG sync) at moments that
    differ between a fresh and a resumed run; kept apart, the stream LoRA dropout uses is a
    function of the step alone, and a resumed run matches an uninterrupted one to the bit.
    """
    rng = torch.get_rng_state()
    try:
        return next(groups)
    finally:
        torch.set_rng_state(rng)


@torch.no_grad()
def evaluate(model, val_rows, collator, accelerator, micro_batch: int) -> tuple[float, int]:
    """Token-weighted mean loss over the whole validation split, every process a shard of it."""
    # The unwrapped model: DDP's forward syncs buffers, and the shards may differ by a batch.
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    shard = range(accelerator.process_index, len(val_rows), accelerator.num_processes)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(shard), micro_batch):
        batch = collator([val_rows[i] for i in shard[start:start + micro_batch]])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        total[0] += loss_sum(model, batch).double()
        total[1] += target_tokens(batch)
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    tokens = int(total[1].item())
    return (float(total[0].item()) / tokens if tokens else float("nan")), tokens


def adapter_is_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------
# Preemption: a scheduler's SIGTERM/SIGINT becomes a checkpoint at the next step boundary.
# ---------------------------------------------------------------------------

class Preemption:
    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True on every process if any process was signalled (so all of them save together)."""
        flag = torch.tensor([1 if self.signal_name else 0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())


# ---------------------------------------------------------------------------
# Checkpoints: atomic save, retention, best adapter.
# ---------------------------------------------------------------------------

class Checkpointer:
    def __init__(self, accelerator, model, tokenizer, cfg, logs, stats, total_steps: int):
        self.accelerator, self.model, self.tokenizer, self.cfg, self.logs = accelerator, model, tokenizer, cfg, logs
        self.stats, self.total_steps = stats, total_steps
        self.output_dir = cfg.paths.output_dir
        self.val_losses: dict[str, float | None] = {}
        for _, path in ckpt.list_checkpoints(self.output_dir):
            self.val_losses[path] = ckpt.read_meta(path).get("val_loss")
        # Only LoRA weights go into a checkpoint; the 4-bit base is reloaded from model_dir.
        accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, inp: models.clear())

    def save(self, step: int, meta: dict, final: bool = False) -> str:
        """Write the checkpoint atomically on every process; on any failure remove the partial folder and raise."""
        acc = self.accelerator
        target = ckpt.checkpoint_path(self.output_dir, step, final)
        tmp = os.path.join(self.output_dir, f".tmp-{os.path.basename(target)}")
        if self.stats is not None:  # the open expert-usage interval is training state too
            self.stats.fold_onto_main(lambda x: acc.reduce(x, "sum"))
        self._all_or_none(target, tmp, self._prepare_folder, tmp)
        self._all_or_none(target, tmp, acc.save_state, tmp)
        self._all_or_none(target, tmp, self._finish, step, meta, final, tmp, target)
        return target

    def _prepare_folder(self, tmp: str) -> None:
        if self.accelerator.is_main_process:
            ckpt.check_free_space(self.output_dir, self._estimate_bytes())
            shutil.rmtree(tmp, ignore_errors=True)

    def _finish(self, step: int, meta: dict, final: bool, tmp: str, target: str) -> None:
        if not self.accelerator.is_main_process:
            return
        maybe_kill("checkpoint_write", step)
        maybe_fail_write("checkpoint_write", step, tmp)
        self.accelerator.unwrap_model(self.model).save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        ckpt.finalize(tmp, target, {**meta, "step": step, "final": final}, self.cfg.to_dict())
        self.val_losses[target] = meta.get("val_loss")
        self.logs.event("checkpoint_saved", step, path=target, val_loss=meta.get("val_loss"),
                        size_bytes=ckpt.folder_bytes(target))
        self._apply_retention(step)

    def _all_or_none(self, target: str, tmp: str, work, *args) -> None:
        """Run one phase of a save on every process; if it failed anywhere, every process raises.

        The flag is reduced across processes (which is also the barrier between phases), so a
        full disk on one node stops the whole job with one message instead of a hang.
        """
        error = None
        try:
            work(*args)
        except (OSError, ckpt.CheckpointError) as exc:
            error = exc
        failed = torch.tensor([0 if error is None else 1], device=self.accelerator.device)
        if not self.accelerator.reduce(failed, "max").item():
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, ckpt.CheckpointError):  # the free-space check's own message says it all
            raise error
        latest = ckpt.latest_checkpoint(self.output_dir)
        intact = f"the latest complete checkpoint, {latest}, is intact" if latest else "no earlier checkpoint exists"
        cause = error if error is not None else "another process failed to write its part"
        raise ckpt.CheckpointError(f"could not write checkpoint {target}: {cause}; {intact}; free disk space or "
                                   f"fix permissions on {self.output_dir}, then resume with --resume")

    def _estimate_bytes(self) -> int:
        trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        return 4 * trainable + 64 * 2**20  # adapter + 2 Adam moments + slack for tokenizer and state

    def _apply_retention(self, step: int) -> None:
        entries = [(s, p, self.val_losses.get(p)) for s, p in ckpt.list_checkpoints(self.output_dir)]
        for path in ckpt.retention_victims(entries, self.cfg.logging.keep_top_k):
            shutil.rmtree(path, ignore_errors=True)
            self.val_losses.pop(path, None)
            self.logs.event("checkpoint_deleted", step, path=path,
                            reason=f"not among the {self.cfg.logging.keep_top_k} best by val loss nor the latest")

    def checkpoint_at(self, step: int) -> str | None:
        """The checkpoint this step will be saved as, if any (the final one when both are written)."""
        if step == self.total_steps:
            return ckpt.checkpoint_path(self.output_dir, step, final=True)
        if step % self.cfg.logging.checkpoint_interval == 0:
            return ckpt.checkpoint_path(self.output_dir, step)
        return None

    def save_best_adapter(self, step: int, val_loss: float, previous: float | None) -> None:
        if not self.accelerator.is_main_process:
            return
        target = self.cfg.paths.best_adapter_dir
        tmp = f"{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "best.json"), "w", encoding="utf-8") as fh:
            fh.write(f'{{"step": {step}, "val_loss": {val_loss!r}, "time": {time.time()!r}}}\n')
        ckpt.swap_in(tmp, target)
        self.logs.event("best_updated", step, path=target, val_loss=val_loss, previous=previous,
                        checkpoint=self.checkpoint_at(step))


# ---------------------------------------------------------------------------
# Setup and resume
# ---------------------------------------------------------------------------

class ResumeError(RuntimeError):
    pass


def make_accelerator(cfg):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import GradientAccumulationPlugin

    if cfg.performance.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # cpu=True on a machine without CUDA: otherwise `accelerate launch --num_processes 2`
    # silently runs each process alone instead of over gloo.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        # Groups of exactly grad_accum micro-batches, so the sync counter never drifts.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.optimization.grad_accum_steps,
                                                                sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True,
                                                  data_seed=cfg.training.seed),
    )


def fresh_state() -> dict:
    return {"step": 0, "epoch": 0, "best_val_loss": None, "best_step": None, "nan_skips": 0,
            "elapsed_seconds": 0.0, "last_val_loss": None, "last_eval_step": None}


def check_shared_output_dir(accelerator, output_dir: str) -> None:
    """Every process must see the same paths.output_dir, or checkpoints can't be resumed.

    Each process writes its own RNG state into the checkpoint, and only the main process
    finalises the folder: on node-local disks the other nodes' parts would be lost. The main
    process writes a token; every process reads it back through its own view of the folder.
    """
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    marker = os.path.join(output_dir, ".shared-storage-check")
    token = [f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"]
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(token[0])
    broadcast_object_list(token)
    seen = None
    view = unshared_view(marker, accelerator.process_index)
    if os.path.isfile(view):
        with open(view, encoding="utf-8") as fh:
            seen = fh.read()
    blind = int(accelerator.reduce(torch.tensor([int(seen != token[0])], device=accelerator.device), "sum").item())
    if accelerator.is_main_process:
        os.remove(marker)
    if blind:
        raise ResumeError(f"paths.output_dir {output_dir} is not the same folder for every process: {blind} "
                          f"of {accelerator.num_processes} cannot see what the main process writes there. Put it on "
                          f"storage all nodes share (NFS, Lustre, ...); checkpoints hold every process's state")


def resume_checkpoint(cfg, args, accelerator, logs) -> str | None:
    """The checkpoint to continue from (None: a fresh run), after checking it fits this config."""
    output_dir = cfg.paths.output_dir
    check_shared_output_dir(accelerator, output_dir)
    if accelerator.is_main_process:
        for path in ckpt.clean_incomplete(output_dir):
            print(f"removed incomplete checkpoint {path} (its write was interrupted)")
    accelerator.wait_for_everyone()
    path = args.resume_from
    if path and not ckpt.is_complete(path):
        raise ResumeError(f"--resume_from {path}: not a complete checkpoint (no {ckpt.COMPLETE} marker)")
    if args.resume and not path:
        path = ckpt.latest_checkpoint(output_dir)
        if path is None:
            accelerator.print(f"--resume: no complete checkpoint in {output_dir}; starting from step 0")
    if not path:
        if ckpt.list_checkpoints(output_dir):
            raise ResumeError(f"{output_dir} already holds checkpoints of a run; pass --resume to continue it, "
                              f"or set paths.output_dir to a new folder")
        return None
    with open(os.path.join(path, ckpt.RESOLVED_CONFIG), encoding="utf-8") as fh:
        import yaml
        saved = ckpt.flatten(yaml.safe_load(fh), ckpt.read_meta(path).get("world_size"))
    critical, harmless = ckpt.compare_configs(saved, ckpt.flatten(cfg.to_dict(), accelerator.num_processes))
    if critical:
        details = ", ".join(f"{k} ({saved.get(k)!r} -> {ckpt.flatten(cfg.to_dict(), accelerator.num_processes).get(k)!r})"
                            for k in critical)
        raise ResumeError(f"cannot resume {path}: the checkpoint depends on keys that changed: {details}; "
                          f"restore them or start a new run in another paths.output_dir")
    if harmless:
        accelerator.print(f"resuming {path} with changed settings (allowed): {', '.join(harmless)}")
    accelerator.print(f"resuming from {path}")
    return path


def checkpoint_state(path: str) -> dict:
    """The loop counters (step, epoch, best val loss, ...) a checkpoint was taken at."""
    meta = ckpt.read_meta(path)
    return {k: meta[k] for k in fresh_state() if k in meta}


def load_checkpoint(accelerator, model, path: str) -> None:
    """Optimizer, scheduler, RNG and data-loader position via Accelerate; the LoRA weights via peft."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    accelerator.load_state(path)
    weights = load_file(os.path.join(path, "adapter_model.safetensors"))  # copied onto the model's device
    set_peft_model_state_dict(accelerator.unwrap_model(model), weights)


def meta_of(state: dict, elapsed: float, world_size: int) -> dict:
    val = state["last_val_loss"] if state["last_eval_step"] == state["step"] else None
    return {**state, "elapsed_seconds": elapsed, "val_loss": val, "world_size": world_size}


class DoesNotFit(RuntimeError):
    pass


def memory_plan(cfg, accelerator, force: bool) -> dict:
    """The plan's per-GPU numbers for run_start; on GPUs, refuse a run it says won't fit unless --force.

    The check runs before any weight is loaded, so a hopeless configuration costs seconds, not
    the minutes of streaming 100B parameters in before an out-of-memory error.
    """
    from glmkit.plan import build_plan, verdict_line

    try:
        plan = build_plan(cfg, num_processes=accelerator.num_processes)
    except Exception as exc:  # a plan that cannot be built is reported, never a reason not to train
        return {"planned_memory_error": f"{type(exc).__name__}: {exc}"}
    if accelerator.device.type == "cuda":
        accelerator.print(verdict_line(plan))
        if not plan["fits"] and not force:
            raise DoesNotFit(f"{verdict_line(plan)}; pass --force to start anyway")
    return {"planned_memory": {k: plan.get(k) for k in ("total_bytes_per_gpu", "weights_bytes", "fits", "strategy")}}


# ---------------------------------------------------------------------------
# Progress, timing, memory
# ---------------------------------------------------------------------------

_open_bars = []


def progress_bar(accelerator, step: int, total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not accelerator.is_main_process, desc="train", unit="step",
               dynamic_ncols=True)
    _open_bars.append(bar)
    return bar


def close_progress_bars() -> None:
    """Finish the bar before an error is printed, so the error is the console's last line."""
    while _open_bars:
        _open_bars.pop().close()


class StepClock:
    """Wall time per step, smoothed for the ETA; elapsed time carries over a resume."""

    def __init__(self, elapsed_before: float = 0.0):
        self.base = elapsed_before
        self.start = self.last = time.time()
        self.step_seconds = None
        self.ema = None

    def tick(self) -> float:
        now = time.time()
        self.step_seconds = now - self.last
        self.ema = self.step_seconds if self.ema is None else 0.9 * self.ema + 0.1 * self.step_seconds
        self.last = now
        return self.elapsed()

    def exclude_side_work(self) -> None:
        """Start the next step's interval now, so eval and checkpoint time don't count as step time."""
        self.last = time.time()

    def elapsed(self) -> float:
        return self.base + time.time() - self.start

    def rates(self, tokens: int, step: int, total: int) -> dict:
        seconds = max(self.step_seconds or 0.0, 1e-9)
        return {"tokens_per_sec": tokens / seconds, "steps_per_sec": 1.0 / max(self.ema, 1e-9),
                "eta_seconds": (total - step) * self.ema}


def gpu_memory(peak_only: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {}
    if peak_only:
        return {"gpu_mem_peak": torch.cuda.max_memory_allocated()}
    return {"gpu_mem_allocated": torch.cuda.memory_allocated(), "gpu_mem_reserved": torch.cuda.memory_reserved(),
            "gpu_mem_peak": torch.cuda.max_memory_allocated()}


# ---------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------

def injected_nan(step: int, loss: float) -> float:
    """Fault injection for tests: GLMKIT_FAULT_NAN_STEPS=3,4 makes those steps' loss NaN."""
    steps = os.environ.get("GLMKIT_FAULT_NAN_STEPS", "")
    return float("nan") if str(step) in steps.split(",") else loss


def check_nan_budget(consecutive: int, limit: int) -> None:
    if consecutive >= limit:
        raise FloatingPointError(f"{consecutive} consecutive steps had a non-finite loss or grad norm "
                                 f"(training.max_nan_skips={limit}); lower optimization.learning_rate or check the data")


def run_eval(state, step, model, val_rows, collator, accelerator, logs, checkpointer, micro_batch) -> None:
    if len(val_rows) == 0:
        return
    val_loss, tokens = evaluate(model, val_rows, collator, accelerator, micro_batch)
    perplexity = math.exp(val_loss) if val_loss < 700 else float("inf")
    logs.write("eval", step, val_loss=val_loss, perplexity=perplexity, val_tokens=tokens)
    logs.event("eval", step, val_loss=val_loss, perplexity=perplexity)
    state["last_val_loss"], state["last_eval_step"] = val_loss, step
    maybe_kill("after_eval", step)
    previous = state["best_val_loss"]
    if math.isfinite(val_loss) and (previous is None or val_loss < previous) and adapter_is_finite(model):
        state["best_val_loss"], state["best_step"] = val_loss, step
        checkpointer.save_best_adapter(step, val_loss, previous)


# Errors that a user fixes by changing input: one clear line and exit 2, no traceback.
USER_ERRORS = (ResumeError, ckpt.CheckpointError, DataError, ModelLoadError, FloatingPointError, DoesNotFit)
