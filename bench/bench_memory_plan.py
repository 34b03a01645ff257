#!/usr/bin/env python3
"""GLM-4.5-Air's weights per GPU, four ways, from the kit's memory plan (no weights loaded).

- kit:          `glmkit.model.load.load_model`: every Linear and the fused routed experts NF4
                (double quantization, blocksize 64), everything else in the compute dtype;
- plain path:   `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))`:
                only nn.Linear goes 4-bit, the fused 3-D experts of transformers 5 stay bf16;
- plain + upcast: the plain path after `peft.prepare_model_for_kbit_training`, which casts
                every parameter that is not 4-bit to fp32;
- QLoRA floor:  the paper's 4.127 bits per quantized parameter (NF4 4 bits + 8-bit absmax per
                64 values + fp32 second-level constant per 256 blocks: 4 + 8/64 + 32/(64*256))
                plus bf16 for everything else.

With DDP (the kit's default) every GPU holds a full replica, so these are per-GPU figures.
The plan prices each tensor the way bitsandbytes 0.50 stores it; with `--audit-check` (on by
default) the plan is also checked byte for byte against `audit_model` of the tiny model as
the kit actually loads it.

    .venv/bin/python bench/bench_memory_plan.py [--config training_config.yaml]
"""

from __future__ import annotations

import argparse
import os
import sys

import benchlib

TARGET_RATIO = 1.03


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=benchlib.REAL_CONFIG, help="the recipe to plan (default: training_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-audit-check", action="store_true", help="skip the plan-vs-audit check on the tiny model")
    p.add_argument("--out", default=benchlib.default_out("memory_plan"))
    return p.parse_args(argv)


def audit_check() -> dict:
    """The plan's weight bytes for the tiny model against the bytes of the model load_model builds."""
    from glmkit.model import load as modeling
    from glmkit.plan.fit import build_plan

    benchlib.ensure_tiny_assets()
    cfg = benchlib.tiny_config()
    planned = build_plan(cfg, gpu_memory_bytes=int(80e9), num_processes=1)
    audit = modeling.audit_model(modeling.load_model(cfg))
    per_group = {g: {"plan": planned["groups"].get(g, {}).get("bytes", 0), "audit": audit["groups"][g]["bytes"]}
                 for g in audit["groups"] if g != "lora"}
    return {"model": cfg.paths.model_dir, "compute_dtype": cfg.quantization.compute_dtype,
            "plan_weights_bytes": planned["weights_bytes"], "audit_bytes_total": audit["bytes_total"],
            "equal": planned["weights_bytes"] == audit["bytes_total"], "groups": per_group}


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.quiet()
    from glmkit.config.load import load_config
    from glmkit.plan.fit import build_plan
    from glmkit.plan.weights import QLORA_BITS_PER_PARAM

    info = benchlib.machine_info()
    cfg = load_config(args.config, args.overrides)
    plan = build_plan(cfg)
    floor = plan["qlora_floor_bytes"]
    ways = {
        "kit": plan["weights_bytes"],
        "plain_path": plan["plain_path_weights_bytes"],
        "plain_path_upcast": plan["plain_path_upcast_weights_bytes"],
        "qlora_floor": floor,
    }
    experts = plan["groups"]["routed_experts"]
    payload = {
        "benchmark": "memory_plan",
        "command": "python bench/bench_memory_plan.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "config": os.path.relpath(args.config, benchlib.REPO_ROOT),
        "model": plan["model"], "source": plan["source"], "strategy": plan["strategy"],
        "quantization": plan["quantization"],
        "params_total": plan["params_total"], "quantized_params": plan["quantized_params"],
        "qlora_bits_per_param": QLORA_BITS_PER_PARAM,
        "weights_bytes_per_gpu": ways,
        "ratio_to_floor": {k: v / floor for k, v in ways.items()},
        "kit_vs_floor_target": {"at_most": TARGET_RATIO, "met": ways["kit"] / floor <= TARGET_RATIO},
        "routed_experts_bits_per_param": {"kit": 8 * experts["bytes"] / experts["params"],
                                          "plain_path": 8 * experts["plain_path_bytes"] / experts["params"],
                                          "plain_path_upcast": 8 * experts["plain_path_upcast_bytes"]
                                          / experts["params"]},
        "groups": plan["groups"],
        "per_gpu_total_bytes": {"kit": plan["total_bytes_per_gpu"],
                                "plain_path_upcast": plan["plain_path_total_bytes_per_gpu"]},
        "gpu_memory_bytes": plan["gpu_memory_bytes"], "gpu_memory_source": plan["gpu_memory_source"],
        "fits": {"kit": plan["fits"], "plain_path_upcast": plan["plain_path_fits"]},
        "plan_settings": {"micro_batch_per_gpu": plan["micro_batch_per_gpu"], "max_seq_length": plan["max_seq_length"],
                          "gradient_checkpointing": plan["gradient_checkpointing"]},
    }
    if not args.no_audit_check:
        payload["tiny_plan_vs_audit"] = audit_check()
    print(benchlib.machine_line(info))
    print(render(payload))
    benchlib.write_json(args.out, payload)
    return 0


def render(payload: dict) -> str:
    w, r = payload["weights_bytes_per_gpu"], payload["ratio_to_floor"]
    labels = {"kit": "kit (experts NF4)", "plain_path": "plain transformers path (experts bf16)",
              "plain_path_upcast": "plain path after prepare_model_for_kbit_training (fp32 upcast)",
              "qlora_floor": f"QLoRA floor ({payload['qlora_bits_per_param']} bits/quantized param, bf16 rest)"}
    rows = [[labels[k], f"{w[k] / 1e9:.3f}", f"{r[k]:.5f}x", f"{(w[k] - w['qlora_floor']) / 1e6:+,.1f}"]
            for k in ("kit", "plain_path", "plain_path_upcast", "qlora_floor")]
    out = [f"{payload['model']} ({payload['source']}), {payload['params_total'] / 1e9:.2f} B parameters, "
           f"{payload['quantized_params'] / 1e9:.2f} B of them 4-bit in the kit; {payload['strategy']}: "
           f"weights per GPU = a full replica",
           benchlib.table(["weights per GPU", "GB", "vs QLoRA floor", "MB above floor"], rows, align="lrrr"),
           f"routed experts: {payload['routed_experts_bits_per_param']['kit']:.4f} bits/param in the kit, "
           f"{payload['routed_experts_bits_per_param']['plain_path']:.1f} on the plain path; "
           f"per-GPU total (micro batch {payload['plan_settings']['micro_batch_per_gpu']} x "
           f"{payload['plan_settings']['max_seq_length']}): kit {payload['per_gpu_total_bytes']['kit'] / 1e9:.1f} GB, "
           f"plain path after upcast {payload['per_gpu_total_bytes']['plain_path_upcast'] / 1e9:.1f} GB"]
    check = payload.get("tiny_plan_vs_audit")
    if check:
        out.append(f"plan vs audit on the tiny model as loaded: plan {check['plan_weights_bytes']:,} B, "
                   f"audit {check['audit_bytes_total']:,} B: {'equal' if check['equal'] else 'DIFFERENT'}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
