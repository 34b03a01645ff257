#!/usr/bin/env python3
"""FLOPs per token and model FLOPs utilization (MFU) of a QLoRA run, written out term by term.

Why not 6 x N: "6N" is forward (2N) + backward (4N: 2N for the activation gradients, 2N for
the weight gradients) of a model whose weights all train. In QLoRA the 4-bit base is frozen:
its weight gradients are never computed, only the activation gradients that flow through it
to the LoRA adapters. Per token, with N = parameters a token multiplies by (its "active"
parameters: attention projections, the dense MLP, the top-k routed experts + shared expert +
router of each MoE layer, lm_head; not the embedding, which is a lookup):

    forward, weights               2 N
    backward, activation grads     2 N          (no weight grads for the frozen base)
    attention scores, forward      A = layers * heads * (qk_head_dim + v_head_dim) * s
                                   (QK^T over the q/k head dim and PV over the v head dim, 2 FLOPs
                                    per multiply-add, causal: a token attends to s/2 positions on
                                    average; s = max_seq_length; = 2 * layers * heads * head_dim * s
                                    when both are head_dim, as in GLM-4.5-Air)
    attention scores, backward     2 A          (dQ, dK, dV, dP: twice the forward)
    LoRA weights                   ignored      (r * (d_in + d_out) per adapter: < 1% here)

    model FLOPs per token    = 4 N + 3 A
    hardware FLOPs per token = 6 N + 4 A   with gradient checkpointing (one more forward)

GLM-4.7-Flash's multi-head latent attention (MLA) multiplies by other weights: the query down- and
up-projections (hidden -> q_lora_rank -> heads x (nope + rope)), the key/value down-projection
(hidden -> kv_lora_rank + rope) and up-projection (kv_lora_rank -> heads x (nope + v)), and o_proj
(heads x v -> hidden); its q/k head dim is nope + rope (256), not the 64 transformers calls head_dim.
N counts exactly the parameters the audit puts in each group (tests/test_glm47_flash.py).

MFU = tokens/s x model FLOPs per token / peak FLOP/s; HFU the same with hardware FLOPs. The
peak is the dense bf16 tensor-core figure of the GPU's datasheet (no 2:4 sparsity): H100 SXM
and H200 989.4 TFLOP/s, H100 NVL 835, H100 PCIe 756, A100 312. The attention term assumes
contiguous context up to s; packed documents attend only within themselves, so A is an upper
bound on the useful attention work (and dequantizing the 4-bit weights, which costs time but
no matmul FLOPs, is not counted: MFU is lower than for a bf16 model by construction).

    python bench/mfu.py flops --model-dir models/tiny-glm4-moe --seq-len 256
    python bench/mfu.py flops --glm45-air --seq-len 4096
    python bench/mfu.py flops --builtin zai-org/GLM-4.7-Flash --seq-len 4096
    python bench/mfu.py report --name tiny --log runs/x/logs/training_log.jsonl \\
        --model-dir models/tiny-glm4-moe --seq-len 256 --out bench/results/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

# Dense bf16 tensor-core peak per GPU, FLOP/s (datasheets; without structured sparsity).
PEAK_BF16 = [
    ("H200", 989.4e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),     # SXM
    ("GH200", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]


def peak_for(gpu_name: str) -> float | None:
    name = (gpu_name or "").upper().replace("-", " ")
    for key, value in PEAK_BF16:
        if key.upper() in name:
            if key == "H100" and "PCIE" in name:
                return 756e12
            return value
    return None


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def attention_per_layer(config) -> tuple[int, int, int]:
    """(parameters of one layer's attention projections, q/k head dim, v head dim), grouped-query or MLA."""
    h, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    kv_lora = _get(config, "kv_lora_rank")
    if kv_lora:  # multi-head latent attention (glm4_moe_lite)
        nope, rope, v = _get(config, "qk_nope_head_dim"), _get(config, "qk_rope_head_dim"), _get(config, "v_head_dim")
        q_lora = _get(config, "q_lora_rank")
        query = h * q_lora + q_lora * heads * (nope + rope) if q_lora else h * heads * (nope + rope)
        key_value = h * (kv_lora + rope) + kv_lora * heads * (nope + v)
        return query + key_value + heads * v * h, nope + rope, v
    kv, hd = _get(config, "num_key_value_heads"), _get(config, "head_dim")
    q, kvd = heads * hd, kv * hd
    return h * q + 2 * h * kvd + q * h, hd, hd


def dense_layers(config) -> int:
    """Decoder layers with a dense MLP instead of experts: first_k_dense_replace, or mlp_layer_types' count."""
    types = _get(config, "mlp_layer_types")
    return types.count("dense") if types else _get(config, "first_k_dense_replace", 0)


def active_params(config) -> dict:
    """Parameters a token multiplies by, per term, from a Glm4Moe or Glm4MoeLite config (object or dict)."""
    h = _get(config, "hidden_size")
    layers = _get(config, "num_hidden_layers")
    dense = dense_layers(config)
    heads = _get(config, "num_attention_heads")
    per_layer, qk_dim, v_dim = attention_per_layer(config)
    attention = layers * per_layer
    dense_mlp = dense * 3 * h * _get(config, "intermediate_size")
    expert = 3 * h * _get(config, "moe_intermediate_size")
    moe_layers = layers - dense
    routed = moe_layers * _get(config, "num_experts_per_tok") * expert
    shared = moe_layers * _get(config, "n_shared_experts", 0) * expert
    router = moe_layers * _get(config, "n_routed_experts") * h
    lm_head = _get(config, "vocab_size") * h
    total_routed = moe_layers * _get(config, "n_routed_experts") * expert
    terms = {"attention": attention, "dense_mlp": dense_mlp, "routed_experts_top_k": routed,
             "shared_experts": shared, "router": router, "lm_head": lm_head}
    return {"terms": terms, "active": sum(terms.values()), "routed_experts_total": total_routed,
            "layers": layers, "heads": heads, "head_dim": qk_dim, "v_head_dim": v_dim}


def flops_per_token(config, seq_len: int, gradient_checkpointing: bool = True) -> dict:
    p = active_params(config)
    n = p["active"]
    attn_fwd = p["layers"] * p["heads"] * (p["head_dim"] + p["v_head_dim"]) * seq_len
    model = 4 * n + 3 * attn_fwd
    hardware = model + (2 * n + attn_fwd if gradient_checkpointing else 0)
    return {"active_params": n, "active_param_terms": p["terms"], "attention_fwd_flops": attn_fwd,
            "model_flops_per_token": model, "hardware_flops_per_token": hardware, "seq_len": seq_len,
            "gradient_checkpointing": gradient_checkpointing,
            "formula": "model = 4N + 3A (fwd 2N + activation-grad bwd 2N, attention fwd A + bwd 2A); "
                       "hardware = model + 2N + A with gradient checkpointing; "
                       "A = layers * heads * (qk_head_dim + v_head_dim) * seq_len (causal)"}


def load_model_config(model_dir: str | None, glm45_air: bool, builtin: str | None = None):
    if glm45_air or builtin:
        from glmkit.plan.weights import BUILTIN_ARCHITECTURES, GLM45_AIR_NAME

        return dict(BUILTIN_ARCHITECTURES[builtin or GLM45_AIR_NAME])
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def read_log(path: str) -> list[dict]:
    records = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n"):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                records[r["step"]] = r  # resume rule: the latest record of a step wins
    return [records[s] for s in sorted(records)]


def report(args) -> dict:
    config = load_model_config(args.model_dir, False)
    f = flops_per_token(config, args.seq_len, not args.no_gradient_checkpointing)
    log = read_log(args.log)
    timed = log[args.skip_steps:] or log
    tps = [r["tokens_per_sec"] for r in timed if r.get("tokens_per_sec")]
    tokens_per_sec = statistics.median(tps) if tps else None
    peaks = [r["gpu_mem_peak"] for r in log if r.get("gpu_mem_peak") is not None]
    gpu = args.gpu_name or _detect_gpu()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_for(gpu)
    out = {"name": args.name, "log": args.log, "model_dir": args.model_dir, "steps_logged": len(log),
           "steps_timed": len(timed), "median_tokens_per_sec": tokens_per_sec,
           "gpu_mem_peak_bytes": max(peaks) if peaks else None, "gpu": gpu, "peak_bf16_flops": peak,
           "final_loss": log[-1]["loss"] if log else None, **f}
    if tokens_per_sec and peak:
        out["mfu"] = tokens_per_sec * f["model_flops_per_token"] / peak
        out["hfu"] = tokens_per_sec * f["hardware_flops_per_token"] / peak
    return out


def _detect_gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


def merge_into(path: str, key: str, value: dict) -> None:
    data = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    data.setdefault("runs", {})[key] = value
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(f"{path}.tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    fl = sub.add_parser("flops", help="FLOPs per token of a model")
    fl.add_argument("--model-dir")
    fl.add_argument("--glm45-air", action="store_true", help="GLM-4.5-Air's published architecture")
    fl.add_argument("--builtin", metavar="NAME", help="a published architecture built into the kit, e.g. "
                                                      "zai-org/GLM-4.7-Flash")
    fl.add_argument("--seq-len", type=int, required=True)
    fl.add_argument("--no-gradient-checkpointing", action="store_true")
    fl.add_argument("--tokens-per-sec", type=float, help="also print MFU at this throughput")
    fl.add_argument("--gpu-name", default="H100 SXM")
    fl.add_argument("--peak-tflops", type=float)
    rp = sub.add_parser("report", help="tokens/s, peak memory and MFU of a run, merged into a JSON file")
    rp.add_argument("--name", required=True)
    rp.add_argument("--log", required=True, help="<output_dir>/logs/training_log.jsonl")
    rp.add_argument("--model-dir", required=True)
    rp.add_argument("--seq-len", type=int, required=True)
    rp.add_argument("--skip-steps", type=int, default=3, help="warm-up steps left out of the median")
    rp.add_argument("--no-gradient-checkpointing", action="store_true")
    rp.add_argument("--gpu-name")
    rp.add_argument("--peak-tflops", type=float, help="override the datasheet peak (dense bf16 TFLOP/s)")
    rp.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "flops":
        if not (args.model_dir or args.glm45_air or args.builtin):
            p.error("flops needs --model-dir, --glm45-air or --builtin NAME")
        from glmkit.plan.weights import BUILTIN_ARCHITECTURES

        if args.builtin and args.builtin not in BUILTIN_ARCHITECTURES:
            p.error(f"--builtin {args.builtin}: not built in; one of {', '.join(BUILTIN_ARCHITECTURES)}")
        f = flops_per_token(load_model_config(args.model_dir, args.glm45_air, args.builtin), args.seq_len,
                            not args.no_gradient_checkpointing)
        if args.tokens_per_sec:
            peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_for(args.gpu_name)
            f["gpu"], f["peak_bf16_flops"] = args.gpu_name, peak
            f["mfu"] = args.tokens_per_sec * f["model_flops_per_token"] / peak
        print(json.dumps(f, indent=2))
        return 0
    out = report(args)
    merge_into(args.out, args.name, out)
    mfu = f"{100 * out['mfu']:.1f}%" if out.get("mfu") is not None else "n/a"
    mem = f"{out['gpu_mem_peak_bytes'] / 1e9:.2f} GB" if out.get("gpu_mem_peak_bytes") else "n/a"
    tps = f"{out['median_tokens_per_sec']:,.0f}" if out.get("median_tokens_per_sec") else "n/a"
    print(f"{args.name}: {tps} tokens/s (median of {out['steps_timed']} steps), peak GPU memory {mem}, "
          f"{out['model_flops_per_token'] / 1e9:.3f} GFLOP/token (model), MFU {mfu} on {out['gpu'] or 'unknown GPU'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
