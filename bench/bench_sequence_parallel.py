#!/usr/bin/env python3
"""Sequence parallelism on the CPU: per-rank peak memory of a training step against the plan, and the all-to-all's
share of the step.

The mid-size GLM-4.5-Air-architecture checkpoint (bench/midmodel.py: 12 layers, 64 experts, 16 query and 4 KV heads,
under scratch/bench-mid, git-ignored) with the shipped adapter (r 16 on q, k, v, o; dropout 0 so both ways compute
the same thing), NF4 experts, gradient checkpointing, fp32 on the CPU. One packed row of --length tokens per micro-step:

- P=1: one process holds the row;
- P=2: two processes over gloo each hold half of it (distributed.sequence_parallel: 2, DDP over the two), the
       all-to-all around every attention trading heads for tokens (glmkit/model/sequence_parallel.py).

Per rank, after --warmup steps:
- memory, one more step under torch's memory profiler: the peak of live tensor bytes during forward + backward above
  what was live before it (on a GPU, max_memory_allocated less the memory allocated at the start), beside the
  plan's activation_bytes for the same config; and the peak of anonymous resident memory above the step's start
  (sampled every 5 ms, after malloc_trim), which adds what glibc keeps of freed memory;
- time, --steps unprofiled steps: the step's time, the time spent inside the exchanges (each timed) and the bytes a
  rank sends. Both ways compute the same loss (checked, 1e-5). One math thread per rank, so P=1 runs on one core and
P=2 on two: the step times are not a speed comparison. CPU gloo is not NVLink: the all-to-all's share of the step is
this machine's; docs/LONG_CONTEXT.md works out the bytes for GLM-4.5-Air at 128k.

    .venv/bin/python bench/bench_sequence_parallel.py [--length 4096] [--steps 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext

import benchlib
import midmodel  # noqa: E402
from bench_loading import MemorySampler

DEFAULT_DIR = os.path.join(benchlib.SCRATCH, "bench-mid")
SIZES = (1, 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    midmodel.add_size_arguments(p)
    p.add_argument("--model-dir", default=DEFAULT_DIR, help="where to write the checkpoint (git-ignored scratch/)")
    p.add_argument("--length", type=int, default=4096, help="tokens per row")
    p.add_argument("--warmup", type=int, default=1, help="steps before the measured ones")
    p.add_argument("--steps", type=int, default=1, help="timed steps (then one more, profiled for memory)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--out", default=benchlib.default_out("sequence_parallel"))
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config(args, size: int):
    return benchlib.tiny_config([
        f"paths.model_dir={args.model_dir}", f"paths.output_dir={os.path.join(benchlib.SCRATCH, 'bench-sp-run')}",
        f"training.max_seq_length={args.length}", "optimization.micro_batch_per_gpu=1", "lora.r=16", "lora.alpha=32",
        "lora.dropout=0.0", "quantization.compute_dtype=float32", "memory.gradient_checkpointing=true",
        f"distributed.sequence_parallel={size}", f"distributed.num_processes={size}"])


def rows(length: int, steps: int, seed: int = 0):
    """`steps` packed rows of random documents (100 to 3000 tokens) over the mid model's vocabulary."""
    import torch

    from glmkit.data.rows import pack_rows

    generator = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < length * steps:
        n = int(torch.randint(100, 3000, (1,), generator=generator))
        docs.append(torch.randint(2, 2000, (n,), generator=generator).tolist())
        total += n
    packed = pack_rows(docs, length, 1)
    return [{"input_ids": r, "position_ids": p} for r, p in zip(packed["input_ids"], packed["position_ids"])][:steps]


def timed_exchanges():
    """Wrap the all-to-all: seconds inside it and bytes sent, per step."""
    import torch.distributed as dist

    from glmkit.model import sequence_parallel as exchanges

    totals = {"seconds": 0.0, "sent_bytes": 0, "calls": 0}
    plain = exchanges.exchange

    def timed(x, group, scatter_dim, gather_dim):
        start = time.perf_counter()
        out = plain(x, group, scatter_dim, gather_dim)
        totals["seconds"] += time.perf_counter() - start
        size = dist.get_world_size(group)
        totals["sent_bytes"] += x.numel() * x.element_size() * (size - 1) // size
        totals["calls"] += 1
        return out

    exchanges.exchange = timed
    return totals


def live_tensor_peak(profiler) -> int:
    """The most bytes of tensors allocated during a profiled step that were live at once (on a GPU:
    max_memory_allocated less what was allocated at the start). The profiler's allocation events, matched by
    address: a free it did not see (another thread's) is taken from a new allocation at the same address, and frees
    of tensors older than the step are left out, so the number is what the step itself adds."""
    from torch._C._profiler import _EventType

    allocations = []

    def collect(events):
        for event in events:
            if event.tag == _EventType.Allocation:
                allocations.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
            else:
                collect(event.children)

    collect(profiler.profiler.kineto_results.experimental_event_tree())
    live, total, peak = {}, 0, 0
    for _, address, size in sorted(allocations):
        if size > 0:
            total += size - live.get(address, 0)
            live[address] = size
        elif address in live:
            total -= live.pop(address)
        peak = max(peak, total)
    return peak


def worker(args) -> None:
    """One rank (started by torch.distributed.run): load, warm up, measure."""
    import ctypes

    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    from accelerate import Accelerator

    from glmkit.data.rows import make_collator
    from glmkit.model.load import load_model, prepare_for_training
    from glmkit.plan.fit import build_plan
    from glmkit.train.ddp import exclude_frozen_from_sync
    from glmkit.train.sequence_parallel import setup_sequence_parallel
    from glmkit.train.step import loss_sum, target_tokens

    size = args.worker
    accelerator = Accelerator(cpu=True)
    cfg = config(args, size)
    plan = build_plan(cfg, gpu_memory_bytes=int(80e9), num_processes=size)
    layout = setup_sequence_parallel(cfg, accelerator)
    torch.manual_seed(0)
    model = prepare_for_training(load_model(cfg), cfg)
    if size > 1:
        exclude_frozen_from_sync(model)
        model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()
    from transformers import AutoTokenizer

    collate = make_collator(AutoTokenizer.from_pretrained(args.model_dir), cfg)
    from torch.profiler import ProfilerActivity, profile

    exchanged = timed_exchanges()
    libc = ctypes.CDLL("libc.so.6")
    steps, memory = [], {}
    for index, row in enumerate(rows(args.length, args.warmup + args.steps + 1)):
        profiled = index == args.warmup + args.steps  # the last step: memory, under the profiler
        batch = layout.local_batch(collate([row]))
        tokens = accelerator.reduce(torch.tensor(target_tokens(batch)), "sum")
        model.zero_grad(set_to_none=True)
        libc.malloc_trim(0)
        before = MemorySampler.read()["anon"]
        exchanged.update(seconds=0.0, sent_bytes=0, calls=0)
        start = time.perf_counter()
        tracing = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if profiled else nullcontext()
        with MemorySampler() as sampler, tracing as tracer:
            loss = loss_sum(model, batch)
            (loss * accelerator.num_processes / tokens).backward()
        seconds = time.perf_counter() - start
        step_loss = (accelerator.reduce(loss.detach().double(), "sum") / tokens).item()
        if profiled:
            memory = {"tensor_peak_above_start_bytes": live_tensor_peak(tracer),
                      "rss_peak_above_start_bytes": sampler.peak["anon"] - before, "loss": step_loss}
        elif index >= args.warmup:
            steps.append({"seconds": seconds, "loss": step_loss, "exchange_seconds": exchanged["seconds"],
                          "exchange_sent_bytes": exchanged["sent_bytes"], "exchanges": exchanged["calls"]})
    keys = ("activation_bytes", "layer_boundaries_bytes", "layer_peak_bytes", "dequantized_experts_bytes",
            "logits_and_loss_bytes", "sequence_parallel_bytes", "tokens_per_micro_batch")
    result = {"size": size, "rank": accelerator.process_index, "steps": steps, "memory": memory,
              "plan": {key: plan[key] for key in keys}}
    with open(f"{args.result}.rank{accelerator.process_index}.json", "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    if size > 1:
        torch.distributed.destroy_process_group()


def run(size: int, args) -> list[dict]:
    result = os.path.join(os.path.dirname(os.path.abspath(args.model_dir)), f"bench-sp-{size}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(size),
           os.path.abspath(__file__), "--worker", str(size), "--result", result, "--model-dir", args.model_dir,
           "--length", str(args.length), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    # One math thread a rank: more threads than free cores make OpenMP spin (a shared machine's P=1 step took 5x
    # as long with two). So P=1 computes on one core and P=2 on two: the step times are not a speed comparison.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, cwd=benchlib.REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"P={size}: exit {proc.returncode}\n{(proc.stdout[-2000:] + proc.stderr[-4000:]).strip()}")
    ranks = []
    for rank in range(size):
        with open(f"{result}.rank{rank}.json", encoding="utf-8") as fh:
            ranks.append(json.load(fh))
        os.remove(f"{result}.rank{rank}.json")
    return ranks


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model_dir = os.path.abspath(args.model_dir)
    benchlib.quiet()
    if args.worker:
        worker(args)
        return 0
    info = benchlib.machine_info()
    existed = os.path.isdir(args.model_dir)
    print(f"writing the mid-size checkpoint to {args.model_dir} ...", flush=True)
    description = midmodel.write_mid_checkpoint(args.model_dir, **midmodel.sizes_from(args))
    results = {size: run(size, args) for size in SIZES}
    if not existed and not args.keep:
        shutil.rmtree(args.model_dir, ignore_errors=True)

    one_loss = [s["loss"] for s in results[1][0]["steps"]] + [results[1][0]["memory"]["loss"]]
    for rank in results[2]:
        for got, want in zip([s["loss"] for s in rank["steps"]] + [rank["memory"]["loss"]], one_loss):
            assert abs(got - want) <= 1e-5 * abs(want), ("P=2 computed another loss than P=1", got, want)
    table_rows, summary = [], {}
    for size, ranks in results.items():
        for rank in ranks:
            peak = rank["memory"]["tensor_peak_above_start_bytes"]
            rss = rank["memory"]["rss_peak_above_start_bytes"]
            seconds = benchlib.median([s["seconds"] for s in rank["steps"]])
            exchange = benchlib.median([s["exchange_seconds"] for s in rank["steps"]])
            planned = rank["plan"]["activation_bytes"]
            summary[f"P={size} rank {rank['rank']}"] = {
                "tokens": rank["plan"]["tokens_per_micro_batch"], "tensor_peak_above_start_bytes": peak,
                "rss_peak_above_start_bytes": rss, "plan_activation_bytes": planned,
                "measured_over_plan": peak / planned, "step_seconds": seconds, "exchange_seconds": exchange,
                "exchange_share": exchange / seconds, "exchange_sent_bytes": rank["steps"][0]["exchange_sent_bytes"],
                "exchanges": rank["steps"][0]["exchanges"], "plan": rank["plan"]}
            table_rows.append([f"P={size}, rank {rank['rank']}", f"{rank['plan']['tokens_per_micro_batch']:,}",
                               gb(peak), gb(planned), f"{peak / planned:.2f}", gb(rss), f"{seconds:.1f} s",
                               f"{exchange / seconds:.1%}" if size > 1 else "-",
                               f"{rank['steps'][0]['exchange_sent_bytes'] / 1e6:.0f} MB" if size > 1 else "-"])
    one = summary["P=1 rank 0"]["tensor_peak_above_start_bytes"]
    two = max(v["tensor_peak_above_start_bytes"] for k, v in summary.items() if k.startswith("P=2"))
    print(benchlib.machine_line(info))
    print(f"mid-size model: {description['params']['total'] / 1e9:.2f}B params; one row of {args.length:,} tokens, "
          f"fp32, checkpointing; {args.steps} timed step(s) after {args.warmup}, then one profiled")
    print(benchlib.table(["", "tokens held", "tensor peak", "plan: activations", "tensor peak / plan",
                          "RSS peak", "step (fwd+bwd)", "all-to-all share", "sent per step"], table_rows))
    print(f"\nper-rank tensor peak at P=2 / P=1: {two / one:.2f}")
    benchlib.write_json(args.out, {"machine": info, "model": description, "length": args.length,
                                   "warmup": args.warmup, "steps": args.steps, "results": summary,
                                   "p2_over_p1_peak": two / one})
    return 0


if __name__ == "__main__":
    sys.exit(main())
