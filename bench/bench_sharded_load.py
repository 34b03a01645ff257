#!/usr/bin/env python3
"""Peak memory per process while loading a mid-size checkpoint for FSDP2, streamed into the shards or not.

The mid-size GLM-4.5-Air-architecture checkpoint (bench/midmodel.py, under scratch/bench-mid,
git-ignored) is loaded by 2 processes over gloo on the CPU, each way in a fresh pair:

- streamed: what the trainer does under `fsdp` (glmkit/model/sharded_load.py): every packed 4-bit
            tensor is cut to this rank's rows as soon as it is quantized; each layer gets its
            full-size tensors back, one at a time, right before fully_shard;
- whole:    the way before it: each process quantizes the whole model, then fully_shard keeps
            its shards.

Both then add LoRA (attention and experts) and fully_shard every layer, as the trainer does.
Per rank: the peak of anonymous resident memory (sampled every 5 ms; on a GPU the 4-bit part of
it would be the device's), ru_maxrss, the peak of packed 4-bit bytes held as counted from the
tensors, and what is resident once sharded (also after malloc_trim, which returns the freed heap
glibc keeps). The two ways must end with the same model: the
logits of a fixed input, computed sharded, are compared bit for bit.

    .venv/bin/python bench/bench_sharded_load.py [--layers 12] [--experts 64] [--keep]
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

METHODS = ("streamed", "whole")
DEFAULT_DIR = os.path.join(benchlib.SCRATCH, "bench-mid")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    midmodel.add_size_arguments(p)
    p.add_argument("--model-dir", default=DEFAULT_DIR, help="where to write the checkpoint (git-ignored scratch/)")
    p.add_argument("--repeats", type=int, default=1, help="loads per way (a fresh pair of processes each)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--out", default=benchlib.default_out("sharded_load"))
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> None:
    """One rank of a 2-process load (started by torch.distributed.run)."""
    import ctypes
    import resource

    import bitsandbytes  # noqa: F401  (imported before the baseline)
    import peft  # noqa: F401
    import torch
    import torch.distributed as dist

    from glmkit.model import load as modeling
    from glmkit.model.sharded_load import ShardedLoad
    from glmkit.train import fsdp

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = benchlib.tiny_config([f"paths.model_dir={args.model_dir}", "quantization.compute_dtype=bfloat16",
                                "lora.target_parameters=[gate_up_proj,down_proj]", "lora.dropout=0.0"])
    device = torch.device("cpu")
    baseline = MemorySampler.read()
    start = time.perf_counter()
    with MemorySampler() as sampler:
        loaded = ShardedLoad(rank, world) if args.worker == "streamed" else None
        model = modeling.load_model(cfg, device, shard=loaded)
        whole_packed = fsdp.resident_bytes(model)["packed_4bit_bytes"]
        with loaded.shape_stand_ins() if loaded else nullcontext():
            model = modeling.prepare_for_training(model, cfg)
        model = fsdp.shard_model(model, device, loaded)
    seconds = time.perf_counter() - start
    after = MemorySampler.read()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what of `after` is freed heap glibc had kept, not live tensors
    trimmed = MemorySampler.read()
    resident = fsdp.resident_bytes(model)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    result = {"rank": rank, "seconds": seconds, "baseline_anon_bytes": baseline["anon"],
              "peak_anon_bytes": sampler.peak["anon"], "anon_after_bytes": after["anon"],
              "anon_after_trim_bytes": trimmed["anon"],
              "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              # the most packed 4-bit bytes held at once: measured by the loader when streamed; otherwise the
              # whole model, which every process held before fully_shard
              "peak_4bit_bytes": loaded.peak_4bit_bytes if loaded else whole_packed,
              "largest_layer_4bit_bytes": loaded.largest_layer_4bit_bytes if loaded else None,
              **resident}
    with open(f"{args.result}.rank{rank}.json", "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    if rank == 0:
        torch.save(logits, f"{args.result}.logits.pt")
    dist.destroy_process_group()


def run_pair(method: str, args, index: int) -> dict:
    result = os.path.join(os.path.dirname(os.path.abspath(args.model_dir)), f"bench-sharded-{method}-{index}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29700 + index), os.path.abspath(__file__), "--worker", method, "--result", result,
           "--model-dir", args.model_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=benchlib.REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{method}: exit {proc.returncode}\n{(proc.stdout[-2000:] + proc.stderr[-4000:]).strip()}")
    ranks = []
    for rank in range(2):
        with open(f"{result}.rank{rank}.json", encoding="utf-8") as fh:
            ranks.append(json.load(fh))
        os.remove(f"{result}.rank{rank}.json")
    return {"method": method, "ranks": ranks, "logits": f"{result}.logits.pt"}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model_dir = os.path.abspath(args.model_dir)
    benchlib.quiet()
    if args.worker:
        benchlib.set_threads(1)
        worker(args)
        return 0

    import torch

    info = benchlib.machine_info()
    sizes = midmodel.sizes_from(args)
    existed = os.path.isdir(args.model_dir)
    print(f"writing the mid-size checkpoint to {args.model_dir} ...", flush=True)
    description = midmodel.write_mid_checkpoint(args.model_dir, **sizes)
    print(f"  {description['params']['total'] / 1e9:.2f} B parameters, {description['safetensors_bytes'] / 1e9:.2f} GB "
          f"of bf16 safetensors{' (reused)' if existed else ''}", flush=True)

    runs = {m: [] for m in METHODS}
    for rep in range(args.repeats):
        for method in METHODS if rep % 2 == 0 else reversed(METHODS):
            r = run_pair(method, args, rep * len(METHODS) + METHODS.index(method))
            runs[method].append(r)
            peaks = ", ".join(f"{x['peak_anon_bytes'] / 1e9:.2f}" for x in r["ranks"])
            print(f"  {method:<8} peak anonymous per rank {peaks} GB, "
                  f"4-bit peak {r['ranks'][0]['peak_4bit_bytes'] / 1e6:.0f} MB", flush=True)

    logits = {}
    for method, rs in runs.items():
        for r in rs:
            logits.setdefault(method, torch.load(r["logits"]))
            os.remove(r.pop("logits"))
    methods = {}
    for method, rs in runs.items():
        ranks = [x for r in rs for x in r["ranks"]]
        methods[method] = {key: benchlib.median([x[key] for x in ranks]) for key in (
            "peak_anon_bytes", "baseline_anon_bytes", "anon_after_bytes", "anon_after_trim_bytes", "maxrss_bytes", "peak_4bit_bytes",
            "packed_4bit_bytes", "quant_state_bytes", "lora_bytes", "seconds")}
        methods[method]["largest_layer_4bit_bytes"] = ranks[0]["largest_layer_4bit_bytes"]
        methods[method]["runs"] = rs
    new, old = methods["streamed"], methods["whole"]
    comparison = {
        "logits_identical": bool(torch.equal(logits["streamed"], logits["whole"])),
        "peak_anon_ratio": new["peak_anon_bytes"] / old["peak_anon_bytes"],
        "peak_anon_above_baseline_ratio": (new["peak_anon_bytes"] - new["baseline_anon_bytes"])
        / (old["peak_anon_bytes"] - old["baseline_anon_bytes"]),
        "peak_4bit_ratio": new["peak_4bit_bytes"] / old["peak_4bit_bytes"],
    }
    payload = {"benchmark": "sharded_load",
               "command": "python bench/bench_sharded_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": info, "checkpoint": {"path": os.path.relpath(args.model_dir, benchlib.REPO_ROOT),
                                               **description},
               "processes": 2, "methods": methods, "comparison": comparison}
    print()
    print(benchlib.machine_line(info))
    print(render(payload))
    benchlib.write_json(args.out, payload)
    if not args.keep:
        shutil.rmtree(args.model_dir, ignore_errors=True)
        print(f"deleted {args.model_dir} (--keep to keep it)")
    return 0 if comparison["logits_identical"] else 1


def render(payload: dict) -> str:
    labels = {"streamed": "streamed into the shards (now)", "whole": "whole model, then fully_shard (before)"}
    rows = []
    for method, m in payload["methods"].items():
        rows.append([labels[method], f"{m['peak_anon_bytes'] / 1e9:.2f}",
                     f"{(m['peak_anon_bytes'] - m['baseline_anon_bytes']) / 1e9:.2f}",
                     f"{m['peak_4bit_bytes'] / 1e6:.1f}", f"{m['packed_4bit_bytes'] / 1e6:.1f}",
                     f"{m['anon_after_bytes'] / 1e9:.2f} ({m['anon_after_trim_bytes'] / 1e9:.2f})",
                     f"{m['maxrss_bytes'] / 1e9:.2f}", f"{m['seconds']:.0f}"])
    c, cmp = payload["checkpoint"], payload["comparison"]
    head = (f"checkpoint: {c['params']['total'] / 1e9:.2f} B parameters, {c['safetensors_bytes'] / 1e9:.2f} GB bf16; "
            f"2 processes; medians over ranks and repeats; logits identical: {cmp['logits_identical']}")
    return head + "\n" + benchlib.table(
        ["load for fsdp", "peak anonymous GB per rank", "of it above imports", "4-bit peak MB (tensors)",
         "4-bit held after MB", "anonymous after GB (after malloc_trim)", "ru_maxrss GB", "load s"], rows,
        align="lrrrrrrr")


if __name__ == "__main__":
    sys.exit(main())
