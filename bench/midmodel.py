"""A mid-size GLM-4.5-Air-architecture checkpoint, generated locally (random weights).

Same class and checkpoint layout as the real model (Glm4MoeForCausalLM, a dense first layer,
sigmoid-routed experts + a shared expert, partial rotary, GQA, sharded safetensors with an
index and per-expert tensors), at a size a 24 GB machine writes and loads in minutes. The
tiny model's tokenizer is copied in, so the demo corpus trains on it unchanged.

    python bench/midmodel.py scratch/bench-mid [--layers 12] [--experts 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import benchlib

DEFAULTS = {"hidden": 1024, "layers": 12, "experts": 64, "moe_intermediate": 512, "intermediate": 2816,
            "heads": 16, "kv_heads": 4, "head_dim": 64, "top_k": 4}
TINY_MODEL_DIR = os.path.join(benchlib.REPO_ROOT, "models", "tiny-glm4-moe")
STAMP = "bench_mid_config.json"


def mid_config(hidden, layers, experts, moe_intermediate, intermediate, heads, kv_heads, head_dim, top_k,
               vocab_size, eos_token_id, pad_token_id):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        moe_intermediate_size=moe_intermediate, num_hidden_layers=layers, first_k_dense_replace=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.0, attention_bias=True, partial_rotary_factor=0.5,
        max_position_embeddings=8192, tie_word_embeddings=False,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
    )


def param_count(config) -> dict:
    """Total and routed-expert parameters, from the config alone (active ones: bench/mfu.py)."""
    h, L, k = config.hidden_size, config.num_hidden_layers, config.first_k_dense_replace
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if config.attention_bias else 0)
    dense_mlp = 3 * h * config.intermediate_size
    expert = 3 * h * config.moe_intermediate_size
    router = config.n_routed_experts * h
    moe_total = config.n_routed_experts * expert + config.n_shared_experts * expert + router
    norms = L * 2 * h + h
    embed = config.vocab_size * h
    lm_head = config.vocab_size * h
    total = L * attention + k * dense_mlp + (L - k) * moe_total + norms + embed + lm_head
    return {"total": total, "routed_experts": (L - k) * config.n_routed_experts * expert}


def write_mid_checkpoint(model_dir: str, seed: int = 0, max_shard_size: str = "500MB", **sizes) -> dict:
    """Write the checkpoint (bf16) unless one with the same sizes is there; return its description."""
    import torch
    from transformers import AutoTokenizer, Glm4MoeForCausalLM

    from glmkit.demo.tiny import save_with_uneven_routing

    sizes = {**DEFAULTS, **{k: v for k, v in sizes.items() if v is not None}}
    stamp_path = os.path.join(model_dir, STAMP)
    wanted = {"sizes": sizes, "seed": seed}
    if os.path.isfile(stamp_path):
        with open(stamp_path, encoding="utf-8") as fh:
            if json.load(fh).get("request") == wanted:
                with open(stamp_path, encoding="utf-8") as fh2:
                    return json.load(fh2)
    shutil.rmtree(model_dir, ignore_errors=True)
    benchlib.ensure_tiny_assets()
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    config = mid_config(**sizes, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM._from_config(config, dtype=torch.bfloat16)
    save_with_uneven_routing(model, tokenizer, model_dir, max_shard_size)
    del model
    counts = param_count(config)
    disk = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    description = {"request": wanted, "params": counts, "safetensors_bytes": disk}
    with open(stamp_path, "w", encoding="utf-8") as fh:
        json.dump(description, fh, indent=2)
    return description


def add_size_arguments(parser) -> None:
    """--hidden, --layers, ... with DEFAULTS, for every benchmark that writes this checkpoint."""
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value, help=f"model size (default {value})")


def sizes_from(args) -> dict:
    return {k: getattr(args, k) for k in DEFAULTS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    add_size_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    benchlib.quiet()
    desc = write_mid_checkpoint(args.model_dir, seed=args.seed, **sizes_from(args))
    print(json.dumps(desc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
