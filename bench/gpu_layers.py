#!/usr/bin/env python3
"""Per-layer timings of one packed micro-batch, for bench/gpu_smoke.sh (runs on CPU too, as a dry run).

On a GLM-architecture checkpoint loaded the kit's way (4-bit, LoRA on q/k/v/o) and one
micro-batch of packed demo-corpus rows, forward + backward of:

- attention of one decoder layer: sdpa with the block-diagonal 4-D mask vs varlen
  (segment boundaries, no mask; torch's varlen_attn on CUDA in bf16);
- the MoE block of one layer: router, transformers' grouped_mm experts reading the
  4-bit fused expert tensors (dequantized by bitsandbytes' parametrization on every
  read), shared expert; and the dequantization of that layer's experts on its own;
- lm_head + loss: the full-vocabulary loss vs the chunked one (glmkit/train/loss.py).

Each is the median of `--reps` timed repetitions after `--warmup` untimed ones; on CUDA
with a synchronize around each, plus the peak memory allocated during one repetition
above what was allocated before it. Results merge into the JSON file `--out` under
runs.<name>.

    python bench/gpu_layers.py --model-dir scratch/bench-mid --seq-len 4096 --micro-batch 2 \\
        --out bench/results/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import benchlib
from mfu import merge_into


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="layers")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int) -> dict:
    """Median seconds of fn() (and on CUDA the peak bytes one call allocates above the starting point)."""
    import torch

    for _ in range(warmup):
        fn()
    seconds, peak = [], None
    for rep in range(reps):
        sync(device)
        if device.type == "cuda" and rep == 0:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
        if device.type == "cuda" and rep == 0:
            peak = torch.cuda.max_memory_allocated(device) - before
    return {"seconds": benchlib.summary(seconds), "peak_bytes": peak}


def packed_rows(cfg, tokenizer, seq_len: int, count: int, seed: int):
    """`count` packed rows of the demo corpus at seq_len, the kit's tokenization; repeated if the corpus is short."""
    import copy
    import tempfile

    from glmkit.data.prepare import prepare_data

    with tempfile.TemporaryDirectory(dir=benchlib.SCRATCH) as cache:
        cfg = copy.deepcopy(cfg)
        cfg.paths.scratch_dir = cache
        rows = prepare_data(cfg, tokenizer, show_progress=False).train_rows
        rows = [rows[i] for i in range(len(rows))]
    random.Random(seed).shuffle(rows)
    return [rows[i % len(rows)] for i in range(count)]


def load(model_dir: str, seq_len: int, dtype: str, micro_batch: int, device):
    """(cfg, model with LoRA, tokenizer): the kit's loading, as train_qlora.py does it."""
    from transformers import AutoTokenizer

    from glmkit.model import load as modeling

    os.makedirs(benchlib.SCRATCH, exist_ok=True)
    cfg = benchlib.tiny_config([f"paths.model_dir={os.path.abspath(model_dir)}",
                                f"training.max_seq_length={seq_len}", f"quantization.compute_dtype={dtype}",
                                f"optimization.micro_batch_per_gpu={micro_batch}", "model.attn_implementation=varlen",
                                f"paths.scratch_dir={benchlib.SCRATCH}"])
    model = modeling.prepare_for_training(modeling.load_model(cfg, device), cfg).train()
    return cfg, model, AutoTokenizer.from_pretrained(cfg.paths.model_dir)


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.quiet()
    import torch

    from glmkit.data.rows import Collator
    from glmkit.model.attention import model_kwargs
    from glmkit.train.loss import chunk_tokens_for, next_token_loss_sum, reference_loss_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    cfg, model, tokenizer = load(args.model_dir, args.seq_len, dtype_name, args.micro_batch, device)
    base = model.get_base_model()
    rows = packed_rows(cfg, tokenizer, args.seq_len, args.micro_batch, args.seed)
    batches = {attn: {k: v.to(device) for k, v in Collator(tokenizer.pad_token_id, True, "longest", args.seq_len,
                                                           attn)(rows).items()}
               for attn in ("sdpa", "varlen")}
    first_moe = base.config.first_k_dense_replace
    layer = base.model.layers[first_moe]
    hidden_size = base.config.hidden_size
    g = torch.Generator(device=device).manual_seed(args.seed)

    def activations():
        return (torch.randn(args.micro_batch, args.seq_len, hidden_size, generator=g, device=device, dtype=dtype)
                .mul_(0.5).requires_grad_(True))

    hidden, upstream = activations(), activations().detach()
    positions = batches["varlen"]["position_ids"]
    rotary = base.model.rotary_emb(hidden, positions)
    results = {"model_dir": args.model_dir, "device": str(device), "dtype": dtype_name, "seq_len": args.seq_len,
               "micro_batch": args.micro_batch, "layer": first_moe,
               "segments": int(batches["varlen"]["cu_seqlens"].numel() - 1),
               "real_tokens": int(batches["varlen"]["token_mask"].sum()), "reps": args.reps}

    # -- attention: the masked sdpa path vs varlen, same q/k/v projections (with LoRA)
    for attn in ("sdpa", "varlen"):
        base.set_attn_implementation(attn)
        batch = batches[attn]
        extra = model_kwargs(batch["cu_seqlens"], batch["max_seqlen"]) if attn == "varlen" else {}

        def attention_step(mask=batch.get("attention_mask"), extra=extra):
            out, _ = layer.self_attn(hidden_states=hidden, position_embeddings=rotary, attention_mask=mask, **extra)
            out.backward(upstream[..., :out.shape[-1]])
            hidden.grad = None

        results[f"attention_{attn}"] = timed(attention_step, device, args.reps, args.warmup)
    base.set_attn_implementation("varlen")
    results["attention_speedup"] = (results["attention_sdpa"]["seconds"]["median"]
                                    / results["attention_varlen"]["seconds"]["median"])

    # -- the MoE block (grouped_mm experts on 4-bit weights), and dequantizing its experts alone
    def moe_step():
        layer.mlp(hidden).backward(upstream)
        hidden.grad = None

    def dequantize_experts():
        with torch.no_grad():
            return layer.mlp.experts.gate_up_proj.sum() + layer.mlp.experts.down_proj.sum()

    results["moe_block"] = timed(moe_step, device, args.reps, args.warmup)
    results["experts_dequantize"] = timed(dequantize_experts, device, args.reps, args.warmup)
    results["experts_implementation"] = base.config._experts_implementation

    # -- lm_head + loss, full vocabulary vs chunked
    head, labels = base.get_output_embeddings(), batches["varlen"]["labels"]
    for name, loss_fn in (("loss_full", lambda: reference_loss_sum(hidden, head, labels)),
                          ("loss_chunked", lambda: next_token_loss_sum(hidden, head, labels))):
        def loss_step(loss_fn=loss_fn):
            loss_fn().backward()
            hidden.grad = None

        results[name] = timed(loss_step, device, args.reps, args.warmup)
    results["loss_chunk_tokens"] = chunk_tokens_for(head.weight.shape[0])
    results["vocab"] = head.weight.shape[0]

    merge_into(args.out, args.name, results)
    ms = {k: 1e3 * v["seconds"]["median"] for k, v in results.items() if isinstance(v, dict) and "seconds" in v}
    peak = {k: v["peak_bytes"] for k, v in results.items() if isinstance(v, dict) and "peak_bytes" in v}
    print(benchlib.table(["layer part (fwd + bwd)", "median ms", "peak MB"],
                         [[k, f"{v:.2f}", "n/a" if peak[k] is None else f"{peak[k] / 1e6:.1f}"] for k, v in ms.items()]))
    print(f"attention: varlen {results['attention_speedup']:.2f}x masked sdpa on {results['segments']} segments "
          f"in {args.micro_batch} x {args.seq_len} ({device}, {dtype_name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
