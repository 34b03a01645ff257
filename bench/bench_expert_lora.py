#!/usr/bin/env python3
"""LoRA on the routed experts: what it costs per step, what the adapter weighs, and the merge.

1. Step time and peak memory, attention-only LoRA vs attention + routed-expert LoRA, on the
   tiny model and the mid-size GLM-architecture checkpoint (bench/midmodel.py). Each variant
   runs the loop's own `train_step` in a fresh process (4-bit base, gradient checkpointing,
   grouped_mm experts; dropout 0 in both so only the targets differ); the processes alternate
   A B B A so the machine's load drifts out, and the medians of the steps after the warm-up are
   reported, wall time and CPU time (the shared machine's wall time is noisy).
2. Adapter size: adapter_model.safetensors of each variant, and GLM-4.5-Air's from the plan.
3. The merge on the mid-size checkpoint with the attention + experts adapter: the previous
   `use_adapter.py --merge` (the whole bf16 base in memory, peft's merge_and_unload,
   save_pretrained) against the streaming one (glmkit.model.adapter.merge), each in a fresh process:
   peak RSS, peak anonymous memory, wall time, and the largest difference between their outputs.

    .venv/bin/python bench/bench_expert_lora.py [--steps 6] [--mid-steps 4] [--repeats 2] [--sections tiny,mid,merge,air]

Each section's results are written as soon as it finishes (a rerun of some sections keeps the others).
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

EXPERTS = "[mlp.experts.gate_up_proj,mlp.experts.down_proj]"
MID_DIR = os.path.join(benchlib.SCRATCH, "bench-mid")
WORK = os.path.join(benchlib.SCRATCH, "bench-expert-lora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per process on the tiny model")
    p.add_argument("--mid-steps", type=int, default=4, help="timed steps per process on the mid-size model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2, help="processes per variant (alternating A B B A)")
    p.add_argument("--expert-r", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sections", default="tiny,mid,merge,air",
                   help="comma-separated: tiny, mid (step comparisons), merge (mid-size), air (GLM-4.5-Air plan)")
    p.add_argument("--child", choices=["steps", "merge"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["attention", "experts"], help=argparse.SUPPRESS)
    p.add_argument("--how", choices=["old", "streaming"], help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--save-to", help=argparse.SUPPRESS)
    p.add_argument("--out", default=benchlib.default_out("expert_lora"))
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Children (one measurement per fresh process)
# ---------------------------------------------------------------------------

def _rss() -> dict:
    from bench_loading import MemorySampler

    return MemorySampler.read()


def child_steps(args) -> dict:
    import torch
    from bench_loading import MemorySampler
    from transformers import AutoTokenizer

    from glmkit.data import rows as data
    from glmkit.data.prepare import prepare_data
    from glmkit.model import load as modeling
    from glmkit.train.distributed import make_accelerator
    from glmkit.train.optim import make_optimizer_and_scheduler
    from glmkit.train.step import next_group, step_groups, train_step

    overrides = [f"paths.model_dir={args.model_dir}", "lora.dropout=0"]
    if args.variant == "experts":
        overrides += [f"lora.target_parameters={EXPERTS}", f"lora.expert_r={args.expert_r}"]
    cfg = benchlib.tiny_config(overrides)
    torch.manual_seed(cfg.training.seed)
    accelerator = make_accelerator(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.paths.model_dir)
    rows = prepare_data(cfg, tokenizer, show_progress=False).train_rows
    loader = torch.utils.data.DataLoader(rows, batch_size=cfg.optimization.micro_batch_per_gpu, shuffle=True,
                                         collate_fn=data.make_collator(tokenizer, cfg))
    model = modeling.prepare_for_training(modeling.load_model(cfg, accelerator.device), cfg)
    audit = modeling.audit_model(model)
    optimizer, scheduler = make_optimizer_and_scheduler(model, cfg, 10_000)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    groups = step_groups(loader, cfg.optimization.grad_accum_steps, 0)
    before = _rss()
    walls, cpus = [], []
    with MemorySampler() as sampler:
        for step in range(args.warmup + args.steps):
            group = next_group(groups)[1]
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(model, group, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler, stats=None,
                       max_grad_norm=cfg.optimization.max_grad_norm, step=step + 1)
            if step >= args.warmup:
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
    adapter_bytes = None
    if args.save_to:
        accelerator.unwrap_model(model).save_pretrained(args.save_to)
        tokenizer.save_pretrained(args.save_to)
        adapter_bytes = os.path.getsize(os.path.join(args.save_to, "adapter_model.safetensors"))
    return {"step_wall_s": walls, "step_cpu_s": cpus, "trainable": audit["trainable_params_by_group"],
            "rss_before_steps": before["anon"] + before["file"], "anon_before_steps": before["anon"],
            "peak_rss_during_steps": sampler.peak["total"], "peak_anon_during_steps": sampler.peak["anon"],
            "adapter_bytes": adapter_bytes, "tokens_per_step": cfg.optimization.micro_batch_per_gpu
            * cfg.optimization.grad_accum_steps * cfg.training.max_seq_length}


def child_merge(args) -> dict:
    import resource

    import torch
    from bench_loading import MemorySampler

    start = time.perf_counter()
    with MemorySampler(interval=0.01) as sampler:
        if args.how == "old":  # use_adapter.py --merge before the streaming merge
            from glmkit.model.adapter import load_base_with_adapter

            model, tokenizer = load_base_with_adapter(args.model_dir, args.adapter, torch.bfloat16)
            merged = model.merge_and_unload()
            merged.save_pretrained(args.save_to)
            tokenizer.save_pretrained(args.save_to)
        else:
            from glmkit.model.adapter import merge

            merge(args.model_dir, args.adapter, args.save_to, torch.bfloat16)
    return {"seconds": time.perf_counter() - start, "peak_rss": sampler.peak["total"],
            "peak_anon": sampler.peak["anon"], "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ---------------------------------------------------------------------------
# The parent: alternate children, collect medians
# ---------------------------------------------------------------------------

def run_child(extra: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": benchlib.BENCH_DIR + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *extra, "--threads", str(threads)],
                            capture_output=True, text=True, env=env, cwd=benchlib.REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"child {extra} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_comparison(name: str, model_dir: str, steps: int, args) -> dict:
    runs = {"attention": [], "experts": []}
    order = ["attention", "experts", "experts", "attention"] * ((args.repeats + 1) // 2)
    for i, variant in enumerate(order[:2 * args.repeats]):
        save = os.path.join(WORK, f"{name}-{variant}-adapter") if not runs[variant] else None
        if save:
            shutil.rmtree(save, ignore_errors=True)
        extra = ["--child", "steps", "--model-dir", model_dir, "--variant", variant, "--steps", str(steps),
                 "--warmup", str(args.warmup), "--expert-r", str(args.expert_r)] + (["--save-to", save] if save else [])
        print(f"  {name}: {variant} process {i + 1}/{2 * args.repeats}", flush=True)
        runs[variant].append(run_child(extra, args.threads))
        print(f"    {json.dumps(runs[variant][-1])}", flush=True)
    out = {}
    for variant, results in runs.items():
        out[variant] = {
            "step_wall_s": benchlib.summary([w for r in results for w in r["step_wall_s"]]),
            "step_cpu_s": benchlib.summary([c for r in results for c in r["step_cpu_s"]]),
            "peak_rss_during_steps": max(r["peak_rss_during_steps"] for r in results),
            "step_rss_increase": max(r["peak_rss_during_steps"] - r["rss_before_steps"] for r in results),
            "peak_anon_during_steps": max(r["peak_anon_during_steps"] for r in results),
            "trainable": results[0]["trainable"], "adapter_bytes": results[0]["adapter_bytes"],
            "tokens_per_step": results[0]["tokens_per_step"],
        }
    out["ratio_wall"] = out["experts"]["step_wall_s"]["median"] / out["attention"]["step_wall_s"]["median"]
    out["ratio_cpu"] = out["experts"]["step_cpu_s"]["median"] / out["attention"]["step_cpu_s"]["median"]
    return out


def merge_comparison(args) -> dict:
    adapter = os.path.join(WORK, "mid-experts-adapter")
    results = {"old": [], "streaming": []}
    for how in ["old", "streaming", "streaming", "old"][:2 * args.repeats]:
        out_dir = os.path.join(WORK, f"merged-{how}")
        shutil.rmtree(out_dir, ignore_errors=True)
        print(f"  merge: {how}", flush=True)
        results[how].append(run_child(["--child", "merge", "--how", how, "--model-dir", MID_DIR, "--adapter",
                                       adapter, "--save-to", out_dir], args.threads))
        print(f"    {json.dumps(results[how][-1])}", flush=True)
    summary = {how: {"seconds": benchlib.summary([r["seconds"] for r in rs]),
                     "peak_rss": max(r["peak_rss"] for r in rs), "peak_anon": max(r["peak_anon"] for r in rs),
                     "ru_maxrss": max(r["ru_maxrss"] for r in rs)} for how, rs in results.items()}
    summary["max_abs_diff"] = compare_merges(os.path.join(WORK, "merged-old"), os.path.join(WORK, "merged-streaming"))
    summary["shards"] = len({v for v in json.load(open(os.path.join(MID_DIR, "model.safetensors.index.json"),
                                                       encoding="utf-8"))["weight_map"].values()})
    summary["largest_shard_bytes"] = max(os.path.getsize(os.path.join(MID_DIR, f)) for f in os.listdir(MID_DIR)
                                         if f.endswith(".safetensors"))
    return summary


def compare_merges(old_dir: str, new_dir: str) -> dict:
    """Largest |old - streaming| over every tensor (bf16: old adds the delta in bf16, streaming in fp32)."""
    from safetensors import safe_open

    from glmkit.model.adapter import checkpoint_weight_map

    def tensors(folder):  # save_pretrained wrote the old merge as one file, the streaming merge keeps the shards
        for key, shard in sorted(checkpoint_weight_map(folder).items()):
            with safe_open(os.path.join(folder, shard), framework="pt") as fh:
                yield key, fh.get_tensor(key).float()

    old = dict(tensors(old_dir))
    worst, worst_rel, keys_equal = 0.0, 0.0, True
    for key, new in tensors(new_dir):
        if key not in old:
            keys_equal = False
            continue
        diff = (old.pop(key) - new).abs().max().item()
        worst = max(worst, diff)
        worst_rel = max(worst_rel, diff / max(new.abs().max().item(), 1e-12))
    return {"max_abs": worst, "max_rel_to_tensor_max": worst_rel, "same_keys": keys_equal and not old,
            "old_files": sorted(f for f in os.listdir(old_dir) if f.endswith(".safetensors")),
            "streaming_files": sorted(f for f in os.listdir(new_dir) if f.endswith(".safetensors"))}


def glm45_air_adapter_bytes(expert_r: int) -> dict:
    from glmkit.config.load import load_config
    from glmkit.plan.fit import build_plan

    cfg = load_config(benchlib.REAL_CONFIG, ["paths.model_dir=/nonexistent", "lora.dropout=0"])
    plain = build_plan(cfg, gpu_memory_bytes=int(141e9), num_processes=4)
    cfg = load_config(benchlib.REAL_CONFIG, ["paths.model_dir=/nonexistent", "lora.dropout=0",
                                             f"lora.target_parameters={EXPERTS}", f"lora.expert_r={expert_r}"])
    experts = build_plan(cfg, gpu_memory_bytes=int(141e9), num_processes=4)
    return {"attention_params": plain["lora_params"], "experts_params": experts["lora_params"],
            "attention_adapter_bytes": 4 * plain["lora_params"], "experts_adapter_bytes": 4 * experts["lora_params"],
            "attention_total_per_gpu": plain["total_bytes_per_gpu"],
            "experts_total_per_gpu": experts["total_bytes_per_gpu"],
            "experts_activation_bytes": experts["activation_bytes"], "attention_activation_bytes": plain["activation_bytes"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        benchlib.quiet()
        benchlib.set_threads(args.threads)
        result = child_steps(args) if args.child == "steps" else child_merge(args)
        print(json.dumps(result))
        return 0
    info = benchlib.start_tiny_bench(args.threads)
    os.makedirs(WORK, exist_ok=True)
    sections = set(args.sections.split(","))
    payload = {}
    if os.path.isfile(args.out):  # keep the sections not rerun
        with open(args.out, encoding="utf-8") as fh:
            payload = json.load(fh)
    payload.setdefault("machine_by_section", {})
    payload["settings"] = {k: v for k, v in vars(args).items() if k not in ("child", "model_dir", "variant", "how",
                                                                            "adapter", "save_to")}

    def done(section: str, result) -> None:
        payload[section] = result
        payload["machine_by_section"][section] = info
        benchlib.write_json(args.out, payload)

    if "tiny" in sections:
        done("tiny", step_comparison("tiny", os.path.join(benchlib.REPO_ROOT, "models", "tiny-glm4-moe"),
                                     args.steps, args))
    if sections & {"mid", "merge"}:
        from midmodel import write_mid_checkpoint

        payload["mid_model"] = write_mid_checkpoint(MID_DIR)
    if "mid" in sections:
        done("mid", step_comparison("mid", MID_DIR, args.mid_steps, args))
    if "merge" in sections:
        done("merge", merge_comparison(args))
    if "air" in sections:
        done("glm45_air", glm45_air_adapter_bytes(args.expert_r))
    print(render(payload, info))
    return 0


def render(p: dict, info: dict) -> str:
    gb = 1e9
    rows = []
    for name in ("tiny", "mid"):
        if name not in p:
            continue
        for variant in ("attention", "experts"):
            r = p[name][variant]
            rows.append([f"{name}: {'attention + experts' if variant == 'experts' else 'attention only'}",
                         f"{r['trainable']['attention'] + r['trainable']['routed_experts']:,}",
                         f"{r['step_wall_s']['median']:.3f}", f"{r['step_cpu_s']['median']:.3f}",
                         f"{r['peak_rss_during_steps'] / gb:.2f}", f"{r['step_rss_increase'] / 1e6:.0f}",
                         f"{r['adapter_bytes'] / 1e6:.2f}"])
        rows.append([f"{name}: ratio", "", benchlib.fmt_ratio(p[name]["ratio_wall"]),
                     benchlib.fmt_ratio(p[name]["ratio_cpu"]), "", "", ""])
    lines = [benchlib.machine_line(info), "",
             benchlib.table(["model: LoRA on", "trainable", "step wall s", "step CPU s", "peak RSS GB",
                             "RSS added by steps MB", "adapter MB"], rows)]
    if "merge" in p:
        m = p["merge"]
        lines += ["", benchlib.table(["merge (mid-size, attention + experts adapter)", "wall s", "peak RSS GB",
                                      "peak anonymous GB"],
                                     [[how, f"{m[how]['seconds']['median']:.1f}", f"{m[how]['peak_rss'] / gb:.2f}",
                                       f"{m[how]['peak_anon'] / gb:.2f}"] for how in ("old", "streaming")]),
                  f"\nold vs streaming output: max |diff| {m['max_abs_diff']['max_abs']:.3g} "
                  f"(relative to the tensor's max {m['max_abs_diff']['max_rel_to_tensor_max']:.3g}), same keys: "
                  f"{m['max_abs_diff']['same_keys']}; {m['shards']} shards, largest "
                  f"{m['largest_shard_bytes'] / gb:.2f} GB"]
    g = p.get("glm45_air")
    lines.append("" if g is None else f"\nGLM-4.5-Air (plan, DDP x 4): adapter {g['attention_adapter_bytes'] / gb:.2f} GB attention-only vs "
                 f"{g['experts_adapter_bytes'] / gb:.2f} GB with experts at rank {p['settings']['expert_r']}; per GPU "
                 f"{g['attention_total_per_gpu'] / gb:.1f} vs {g['experts_total_per_gpu'] / gb:.1f} GB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
