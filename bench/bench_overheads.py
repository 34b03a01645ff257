#!/usr/bin/env python3
"""Overheads of the loop's bookkeeping, as a share of step time, on the tiny model.

The step is the kit's (train_qlora.py's loop body: token-weighted loss over the micro-batches
under `accelerator.accumulate`, clipping, AdamW + cosine schedule) on the kit's model, data
loader and Accelerator. Measured:

- router statistics: `RouterStats` forward hooks on vs off, with begin/commit per
  micro-batch (A/B), and the hooks' own work replayed and timed directly; the
  every-`expert_stats_interval` `take()` + `record()` is timed on its own and amortized;
- logging: one `RunLogs.write("train", ...)` per step with the loop's fields vs none;
- checkpoint: one `Checkpointer.save` (Accelerate state, adapter, tokenizer, resolved
  config, fsync, rename, retention) against the median step, amortized over
  `checkpoint.interval` (the tiny recipe's and the real recipe's).

A/B steps are paired and interleaved (ABBA) on the same micro-batches, and the overhead is
the median of the per-pair ratios, so the machine's load drifts out. Steps draw their
micro-batches before the clock starts: the percentages are of compute time, so slightly
larger than of the loop's full step time.

    .venv/bin/python bench/bench_overheads.py [--pairs 40] [--saves 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import benchlib


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=40, help="A/B step pairs per comparison")
    p.add_argument("--saves", type=int, default=3, help="checkpoint saves timed")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--real-checkpoint-interval", type=int, default=None,
                   help="second interval to amortize a save over (default: training_config.yaml's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see BENCHMARKS.md)")
    p.add_argument("--out", default=benchlib.default_out("overheads"))
    return p.parse_args(argv)


class Harness:
    """The kit's setup from train_qlora.train, minus what the measured pieces don't need."""

    def __init__(self, cfg):
        import torch
        from transformers import AutoTokenizer

        from glmkit.data import rows as data
        from glmkit.data.prepare import prepare_data
        from glmkit.model import load as modeling
        from glmkit.run.logs import RunLogs
        from glmkit.train.checkpoint import Checkpointer
        from glmkit.train.distributed import make_accelerator
        from glmkit.train.optim import make_optimizer_and_scheduler
        from glmkit.train.step import step_groups

        self.cfg = cfg
        t, o = cfg.training, cfg.optimization
        torch.manual_seed(t.seed)
        self.accelerator = make_accelerator(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.paths.model_dir)
        rows = prepare_data(cfg, self.tokenizer, show_progress=False).train_rows
        loader = torch.utils.data.DataLoader(rows, batch_size=o.micro_batch_per_gpu, shuffle=True,
                                             collate_fn=data.make_collator(self.tokenizer, cfg))
        model = modeling.prepare_for_training(modeling.load_model(cfg, self.accelerator.device), cfg)
        self.total_steps = 10_000
        optimizer, self.scheduler = make_optimizer_and_scheduler(model, cfg, self.total_steps)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.logs = RunLogs(cfg.logs_dir)
        self.checkpointer = Checkpointer(self.accelerator, self.model, self.tokenizer, cfg, self.logs,
                                                stats=None, total_steps=self.total_steps)
        self.groups = step_groups(self.loader, o.grad_accum_steps, 0)
        self.step_count = 0
        self.model.train()

    def next_group(self):
        from glmkit.train.step import next_group

        return next_group(self.groups)[1]

    def step(self, group, stats=None, log=False) -> tuple[float, float, float]:
        """One optimizer step, the loop's own `train_step`; (wall s, CPU s, loss)."""
        from glmkit.train.step import train_step

        wall, cpu = time.perf_counter(), time.process_time()
        self.step_count += 1
        result = train_step(self.model, group, accelerator=self.accelerator, optimizer=self.optimizer,
                            scheduler=self.scheduler, stats=stats, max_grad_norm=self.cfg.optimization.max_grad_norm,
                            step=self.step_count)
        if log:
            self.write_log(result.loss, result.lr, result.grad_norm, result.input_tokens, time.perf_counter() - wall)
        return time.perf_counter() - wall, time.process_time() - cpu, result.loss

    def write_log(self, loss, lr, grad_norm, tokens, seconds) -> None:
        """The loop's per-step record, field for field (gpu_memory() is empty on a CPU)."""
        from glmkit.train.progress import gpu_memory

        step = self.step_count
        self.logs.write("train", step, loss=loss, lr=lr, grad_norm=grad_norm, aux_loss=None, epoch=step / 100,
                        tokens=tokens, tokens_per_sec=tokens / max(seconds, 1e-9), steps_per_sec=1 / max(seconds, 1e-9),
                        eta_seconds=(self.total_steps - step) * seconds, elapsed_seconds=float(step),
                        total_steps=self.total_steps, **gpu_memory())


def paired_ratios(harness, pairs: int, run_a, run_b) -> dict:
    """ABBA-interleaved pairs on the same micro-batches; ratio b/a per pair."""
    walls_a, walls_b, cpus_a, cpus_b, ratios, cpu_ratios = [], [], [], [], [], []
    for i in range(pairs):
        group = harness.next_group()
        if i % 2 == 0:
            a, b = run_a(group), run_b(group)
        else:
            b, a = run_b(group), run_a(group)
        walls_a.append(a[0])
        walls_b.append(b[0])
        cpus_a.append(a[1])
        cpus_b.append(b[1])
        ratios.append(b[0] / a[0])
        cpu_ratios.append(b[1] / a[1])
    return {"off_step_seconds": benchlib.summary(walls_a), "on_step_seconds": benchlib.summary(walls_b),
            "off_step_cpu_seconds": benchlib.summary(cpus_a), "on_step_cpu_seconds": benchlib.summary(cpus_b),
            "ratio_on_over_off": benchlib.summary(ratios), "cpu_ratio_on_over_off": benchlib.summary(cpu_ratios),
            "overhead_pct": 100 * (benchlib.median(ratios) - 1),
            "overhead_pct_cpu": 100 * (benchlib.median(cpu_ratios) - 1)}


def router_hooks_direct(h, RouterStats, base_step: float, repeats: int = 200) -> dict:
    """The hooks' own work per step, timed outside the forward pass.

    One real step records every router call (module, inputs, outputs) and its micro-batch's
    token mask; then a micro-batch's bookkeeping (begin_microbatch, each RouterStats hook as
    often as it fired, commit_microbatch) is replayed and timed. The hook functions are read
    from torch's per-module hook dict (`_forward_hooks`) by the ids of RouterStats' handles."""
    stats = RouterStats(h.model)
    calls, masks = [], []
    spies = [router.register_forward_hook(lambda m, i, o: calls.append((m, i, o)) if m.training else None)
             for _, router in stats.routers]
    original_begin = stats.begin_microbatch

    def begin(mask):
        masks.append(mask)
        original_begin(mask)

    stats.begin_microbatch = begin
    h.step(h.next_group(), stats=stats)
    for spy in spies:
        spy.remove()
    hooks = {id(router): router._forward_hooks[handle.id]
             for (_, router), handle in zip(stats.routers, stats._handles)}
    stats.remove()
    stats.begin_microbatch = original_begin
    per_microbatch = len(calls) // max(1, len(masks))

    def one_microbatch():
        original_begin(masks[0])
        for module, inputs, outputs in calls[:per_microbatch]:
            hooks[id(module)](module, inputs, outputs)
        stats.commit_microbatch()

    seconds = timed(one_microbatch, repeats)
    per_step = benchlib.median(seconds) * len(masks)
    return {"hook_calls_per_step": len(calls), "microbatches_per_step": len(masks),
            "hooks_seconds_per_microbatch": benchlib.summary(seconds), "hooks_seconds_per_step": per_step,
            "hooks_direct_pct": 100 * per_step / base_step}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    info = benchlib.start_tiny_bench(args.threads)
    from glmkit.config.load import load_config
    from glmkit.train.router_stats import RouterStats

    work = os.path.join(benchlib.SCRATCH, "bench", "overheads")
    shutil.rmtree(work, ignore_errors=True)
    cfg = benchlib.tiny_config([f"paths.output_dir={work}/run", f"paths.best_adapter_dir={work}/best"])
    real_interval = args.real_checkpoint_interval or load_config(benchlib.REAL_CONFIG).checkpoint.interval
    h = Harness(cfg)
    for _ in range(args.warmup):
        h.step(h.next_group())

    # -- router statistics: hooks registered only for the "on" step
    def stats_off(group):
        return h.step(group)

    def stats_on(group):
        stats = RouterStats(h.model)
        try:
            return h.step(group, stats=stats)
        finally:
            stats.remove()

    router = paired_ratios(h, args.pairs, stats_off, stats_on)
    # take() + record() run every expert_stats_interval steps; time them on a filled counter.
    stats = RouterStats(h.model)
    h.step(h.next_group(), stats=stats)
    stats.remove()
    counts_snapshot, tokens_snapshot = stats.counts.clone(), stats.tokens

    def take_and_record():
        stats.counts, stats.tokens = counts_snapshot.clone(), tokens_snapshot
        counts, routed = stats.take(reduce=lambda x: h.accelerator.reduce(x, "sum"))
        h.logs.write("experts", h.step_count, **stats.record(counts, routed))

    take_seconds = timed(take_and_record, 50)
    router["take_record_seconds"] = benchlib.summary(take_seconds)
    router["expert_stats_interval"] = cfg.logging.expert_stats_interval
    base_step = router["off_step_seconds"]["median"]
    router["take_record_amortized_pct"] = (100 * benchlib.median(take_seconds)
                                           / cfg.logging.expert_stats_interval / base_step)
    router["total_pct"] = router["overhead_pct"] + router["take_record_amortized_pct"]
    router.update(router_hooks_direct(h, RouterStats, base_step))

    # -- logging: one training_log.jsonl record per step
    logging_ab = paired_ratios(h, args.pairs, lambda g: h.step(g), lambda g: h.step(g, log=True))
    write_seconds = timed(lambda: h.write_log(7.0, 1e-4, 0.5, 512, 0.2), 200)
    logging_ab["write_seconds"] = benchlib.summary(write_seconds)
    logging_ab["write_pct_of_step"] = 100 * benchlib.median(write_seconds) / logging_ab["off_step_seconds"]["median"]

    # -- checkpoint: one save against the median step
    step_medians = [router["off_step_seconds"]["median"], logging_ab["off_step_seconds"]["median"]]
    median_step = benchlib.median(step_medians)
    save_seconds = []
    for i in range(args.saves):
        h.step(h.next_group())
        start = time.perf_counter()
        path = h.checkpointer.save(h.step_count, {"step": h.step_count, "val_loss": None})
        save_seconds.append(time.perf_counter() - start)
        print(f"  save {i + 1}/{args.saves}: {save_seconds[-1]:.3f} s", flush=True)
    from glmkit.train.checkpoint import folder_bytes

    save = benchlib.median(save_seconds)
    checkpoint = {"save_seconds": benchlib.summary(save_seconds), "median_step_seconds": median_step,
                  "save_over_step": save / median_step, "checkpoint_bytes": folder_bytes(path),
                  "amortized_pct": {str(interval): 100 * save / (interval * median_step)
                                    for interval in (cfg.checkpoint.interval, real_interval)},
                  "intervals": {"tiny_recipe": cfg.checkpoint.interval, "real_recipe": real_interval}}
    h.logs.close()

    payload = {
        "benchmark": "overheads",
        "command": "python bench/bench_overheads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**info, "torch_threads": args.threads},
        "settings": {"pairs": args.pairs, "saves": args.saves, "warmup": args.warmup,
                     "max_seq_length": cfg.training.max_seq_length,
                     "micro_batch": cfg.optimization.micro_batch_per_gpu,
                     "grad_accum": cfg.optimization.grad_accum_steps,
                     "gradient_checkpointing": cfg.memory.gradient_checkpointing, "threads": args.threads},
        "median_step_seconds": median_step,
        "router_stats": router,
        "logging": logging_ab,
        "checkpoint": checkpoint,
    }
    print()
    print(benchlib.machine_line(payload["machine"]))
    print(render(payload))
    benchlib.write_json(args.out, payload)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def render(payload: dict) -> str:
    r, lg, c = payload["router_stats"], payload["logging"], payload["checkpoint"]
    iqr = r["ratio_on_over_off"]
    liqr = lg["ratio_on_over_off"]
    ti, ri = c["intervals"]["tiny_recipe"], c["intervals"]["real_recipe"]
    rows = [
        ["router statistics: hooks on vs off (A/B, wall)", f"{r['overhead_pct']:+.2f}%",
         f"pair ratios p25-p75 {iqr['p25']:.3f}-{iqr['p75']:.3f}; CPU-time {r['overhead_pct_cpu']:+.2f}%"],
        ["router statistics: the hooks' work, timed directly", f"{r['hooks_direct_pct']:.2f}%",
         f"{r['hooks_seconds_per_step'] * 1e3:.2f} ms per step ({r['hook_calls_per_step']} hook calls, "
         f"{r['microbatches_per_step']} micro-batches)"],
        [f"router statistics: take()+record() every {r['expert_stats_interval']} steps",
         f"{r['take_record_amortized_pct']:.3f}%",
         f"{r['take_record_seconds']['median'] * 1e3:.2f} ms each"],
        ["logging: RunLogs.write per step (A/B, wall)", f"{lg['overhead_pct']:+.2f}%",
         f"pair ratios p25-p75 {liqr['p25']:.3f}-{liqr['p75']:.3f}; CPU-time {lg['overhead_pct_cpu']:+.2f}%"],
        ["logging: the write itself, timed directly", f"{lg['write_pct_of_step']:.3f}%",
         f"{lg['write_seconds']['median'] * 1e6:.0f} us per record"],
        ["checkpoint save / median step", f"{c['save_over_step']:.1f} steps",
         f"save {c['save_seconds']['median']:.3f} s, step {c['median_step_seconds']:.3f} s, "
         f"{c['checkpoint_bytes'] / 1e6:.2f} MB"],
        [f"checkpoint amortized, every {ti} steps (tiny recipe)", f"{c['amortized_pct'][str(ti)]:.2f}%", ""],
        [f"checkpoint amortized, every {ri} steps (real recipe)", f"{c['amortized_pct'][str(ri)]:.2f}%", ""],
    ]
    return benchlib.table(["overhead", "share of step time", "detail"], rows, align="lrl")


if __name__ == "__main__":
    sys.exit(main())
