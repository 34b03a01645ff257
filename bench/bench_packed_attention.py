#!/usr/bin/env python3
"""Packed training on CPU: varlen attention vs sdpa with the block-diagonal mask, tokens/s.

The tiny QLoRA model (the kit's `load_model` + `prepare_for_training`, fp32, gradient
checkpointing on, the chunked loss) trains on packed rows of the demo corpus (the kit's
`prepare_data` + collator) at each `--seq-lens`, once per attention implementation:

- sdpa:   a [rows, 1, L, L] boolean block-diagonal mask; every query is scored against the
          whole row (masked, not skipped), K/V expanded to every query head;
- varlen: no mask, the rows' segment boundaries (`cu_seqlens`); each document attends
          causally to itself only, K/V at their own head count (glmkit/model/attention.py; on
          CPU one causal sdpa call per segment length).

The same micro-batches (a seeded sample of the epoch) go through both models, which start
from the same weights; one step is forward + backward of the summed loss. The two
implementations alternate (A B, B A, ...) and the speed-up is the median of the per-pair
ratios; tokens/s by wall time and by the process's CPU time are both reported (CPU time
barely moves when the machine is busy). The losses of the two are compared too.

    .venv/bin/python bench/bench_packed_attention.py [--seq-lens 2048 4096] [--batches 4] [--pairs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import benchlib

IMPLEMENTATIONS = ("sdpa", "varlen")
TARGET_SPEEDUP_AT_2048 = 1.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch (the tiny recipe's)")
    p.add_argument("--batches", type=int, default=4, help="micro-batches timed per implementation and pair")
    p.add_argument("--pairs", type=int, default=3, help="A/B repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see BENCHMARKS.md)")
    p.add_argument("--out", default=benchlib.default_out("packed_attention"))
    return p.parse_args(argv)


def step_seconds(model, batches) -> tuple[float, float, float]:
    """(wall s, CPU s, summed loss) of forward + backward over the micro-batches."""
    from glmkit.train.step import loss_sum

    wall, cpu, total = time.perf_counter(), time.process_time(), 0.0
    for batch in batches:
        loss = loss_sum(model, batch)
        loss.backward()
        total += loss.item()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu, total


def main(argv=None) -> int:
    args = parse_args(argv)
    info = benchlib.start_tiny_bench(args.threads)
    import torch
    from transformers import AutoTokenizer

    from glmkit.data import rows as data
    from glmkit.data.prepare import prepare_data
    from glmkit.model import load as modeling

    base = benchlib.tiny_config()
    tokenizer = AutoTokenizer.from_pretrained(base.paths.model_dir)
    models = {}
    for attn in IMPLEMENTATIONS:
        cfg = benchlib.tiny_config([f"model.attn_implementation={attn}"])
        torch.manual_seed(cfg.training.seed)  # the same LoRA initialisation for both
        models[attn] = modeling.prepare_for_training(modeling.load_model(cfg), cfg).train()

    results = []
    with tempfile.TemporaryDirectory(dir=benchlib.SCRATCH) as cache_dir:
        for seq_len in args.seq_lens:
            cfg = benchlib.tiny_config([f"training.max_seq_length={seq_len}",
                                        f"paths.scratch_dir={os.path.join(cache_dir, str(seq_len))}"])
            rows = prepare_data(cfg, tokenizer, show_progress=False).train_rows
            picked = random.Random(args.seed).sample(range(len(rows) // args.micro_batch), args.batches)
            groups = [[rows[i * args.micro_batch + j] for j in range(args.micro_batch)] for i in picked]
            batches = {attn: [data.Collator(tokenizer.pad_token_id, True, "longest", seq_len, attn)(g) for g in groups]
                       for attn in IMPLEMENTATIONS}
            real = sum(int(b["token_mask"].sum()) for b in batches["sdpa"])
            segments = [int(b["cu_seqlens"].numel() - 1) for b in batches["varlen"]]
            for attn in IMPLEMENTATIONS:  # warm-up, untimed
                step_seconds(models[attn], batches[attn][:1])
            timings = {attn: {"wall": [], "cpu": [], "loss": []} for attn in IMPLEMENTATIONS}
            for pair in range(args.pairs):
                order = IMPLEMENTATIONS if pair % 2 == 0 else IMPLEMENTATIONS[::-1]
                for attn in order:
                    wall, cpu, loss = step_seconds(models[attn], batches[attn])
                    for key, value in (("wall", wall), ("cpu", cpu), ("loss", loss)):
                        timings[attn][key].append(value)
                    print(f"  L={seq_len} pair {pair + 1}/{args.pairs} {attn:<6} {wall:7.2f} s wall {cpu:7.2f} s CPU "
                          f"({real:,} real tokens)", flush=True)
            entry = {"max_seq_length": seq_len, "micro_batches": len(groups), "real_tokens": real,
                     "segments_per_micro_batch": segments}
            for attn, t in timings.items():
                entry[attn] = {"wall_seconds": t["wall"], "cpu_seconds": t["cpu"], "loss_sum": t["loss"][0],
                               "tokens_per_sec": benchlib.summary([real / s for s in t["wall"]]),
                               "tokens_per_cpu_sec": benchlib.summary([real / s for s in t["cpu"]])}
            entry["speedup_wall"] = benchlib.summary([s / v for s, v in zip(timings["sdpa"]["wall"],
                                                                             timings["varlen"]["wall"])])
            entry["speedup_cpu"] = benchlib.summary([s / v for s, v in zip(timings["sdpa"]["cpu"],
                                                                            timings["varlen"]["cpu"])])
            entry["loss_rel_diff"] = abs(entry["varlen"]["loss_sum"] - entry["sdpa"]["loss_sum"]) / abs(entry["sdpa"]["loss_sum"])
            results.append(entry)

    at_2048 = [r for r in results if r["max_seq_length"] == 2048]
    payload = {
        "benchmark": "packed_attention",
        "command": "python bench/bench_packed_attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "settings": {"micro_batch": args.micro_batch, "batches": args.batches, "pairs": args.pairs,
                     "seed": args.seed, "threads": args.threads, "compute_dtype": base.quantization.compute_dtype,
                     "gradient_checkpointing": base.memory.gradient_checkpointing},
        "results": results,
        "target": {"speedup_at_2048_at_least": TARGET_SPEEDUP_AT_2048,
                   "met": bool(at_2048) and at_2048[0]["speedup_cpu"]["median"] >= TARGET_SPEEDUP_AT_2048},
    }
    print()
    print(benchlib.machine_line(info))
    print(render(payload))
    benchlib.write_json(args.out, payload)
    return 0


def render(payload: dict) -> str:
    rows = []
    for r in payload["results"]:
        rows.append([r["max_seq_length"], f"{r['real_tokens']:,}",
                     f"{r['sdpa']['tokens_per_sec']['median']:,.0f}", f"{r['varlen']['tokens_per_sec']['median']:,.0f}",
                     benchlib.fmt_ratio(r["speedup_wall"]["median"]),
                     f"{r['sdpa']['tokens_per_cpu_sec']['median']:,.0f}",
                     f"{r['varlen']['tokens_per_cpu_sec']['median']:,.0f}",
                     benchlib.fmt_ratio(r["speedup_cpu"]["median"]), f"{r['loss_rel_diff']:.1e}"])
    return benchlib.table(["max_seq_length", "real tokens timed", "sdpa tok/s", "varlen tok/s", "speed-up",
                           "sdpa tok/CPU-s", "varlen tok/CPU-s", "speed-up (CPU time)", "loss rel. diff"], rows)


if __name__ == "__main__":
    sys.exit(main())
