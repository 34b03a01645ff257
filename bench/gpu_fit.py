#!/usr/bin/env python3
"""The largest micro-batch that fits, measured, against the memory plan's prediction (bench/gpu_smoke.sh).

The plan (`glmkit.plan.fit.build_plan`) predicts `max_micro_batch_per_gpu` for this checkpoint at
`--seq-len` on `--memory-gb` of GPU memory. Here the caching allocator is capped at that
size (`torch.cuda.set_per_process_memory_fraction`), the model is loaded the kit's way, and
full training micro-steps (forward, backward, AdamW step) run at growing micro-batches of
packed demo-corpus rows: doubling, then bisecting, until one runs out of memory. Reported:
predicted and measured largest micro-batch, and per probed micro-batch the measured peak
(`max_memory_allocated`) beside the plan's per-GPU total without its fixed allowance for
the CUDA context and NCCL (which the allocator does not see).

Without CUDA (the dry run) one micro-step at micro-batch 1 runs and the measurement is
recorded as unmeasured.

    python bench/gpu_fit.py --model-dir scratch/bench-mid --seq-len 4096 --memory-gb 24 \\
        --out bench/results/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys

import benchlib
from gpu_layers import load, packed_rows
from mfu import merge_into


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--memory-gb", type=float, default=24.0, help="GPU memory to fit into (decimal GB)")
    p.add_argument("--max-micro-batch", type=int, default=64, help="stop probing here")
    p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="fit")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.quiet()
    import torch

    from glmkit.data.rows import Collator
    from glmkit.plan import fit as planmod
    from glmkit.train.optim import make_optimizer_and_scheduler
    from glmkit.train.step import loss_sum

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    budget = int(args.memory_gb * 1e9)
    cfg, model, tokenizer = load(args.model_dir, args.seq_len, dtype_name, 1, device)
    plan = planmod.build_plan(cfg, gpu_memory_bytes=budget, num_processes=1)
    predicted = plan["max_micro_batch_per_gpu"]
    optimizer, _ = make_optimizer_and_scheduler(model, cfg, total_steps=10)
    probe_limit = args.max_micro_batch if cuda else 1
    rows = packed_rows(cfg, tokenizer, args.seq_len, probe_limit, args.seed)
    collate = Collator(tokenizer.pad_token_id, True, "longest", args.seq_len, "varlen")
    if cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(device).total_memory),
                                                   device)
    probes = {}

    def fits(micro_batch: int) -> bool:
        batch = {k: v.to(device) for k, v in collate(rows[:micro_batch]).items()}
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            loss_sum(model, batch).backward()
            optimizer.step()
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        optimizer.zero_grad(set_to_none=True)
        del batch
        gc.collect()
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        if cuda:
            torch.cuda.empty_cache()
        sized = copy.deepcopy(cfg)
        sized.optimization.micro_batch_per_gpu = micro_batch
        at = planmod.build_plan(sized, gpu_memory_bytes=budget, num_processes=1)
        planned = at["total_bytes_per_gpu"] - at["per_gpu"]["runtime_overhead"] - at["per_gpu"]["ddp_grad_buckets"]
        probes[micro_batch] = {"ran": ok, "peak_bytes": peak if ok else None, "planned_bytes": planned}
        print(f"  micro batch {micro_batch}: {'ran' if ok else 'out of memory'}"
              + (f", peak {peak / 1e9:.2f} GB, plan {planned / 1e9:.2f} GB" if ok and peak else ""), flush=True)
        return ok

    measured = planmod.largest_micro_batch(fits, limit=probe_limit)
    result = {"model_dir": args.model_dir, "device": str(device), "dtype": dtype_name, "seq_len": args.seq_len,
              "memory_bytes": budget, "predicted_max_micro_batch": predicted,
              "measured_max_micro_batch": measured if cuda else "unmeasured (no GPU)",
              "probe_limit": probe_limit, "probes": {str(k): v for k, v in sorted(probes.items())}}
    merge_into(args.out, args.name, result)
    print(f"largest micro batch at {args.seq_len} tokens in {args.memory_gb:g} GB: plan {predicted}, measured "
          f"{result['measured_max_micro_batch']}" + (f" (probing stopped at {probe_limit})" if cuda and measured == probe_limit else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
