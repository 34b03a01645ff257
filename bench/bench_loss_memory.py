#!/usr/bin/env python3
"""Peak memory of one loss forward + backward: the full-vocabulary loss vs the chunked one.

- full:    `glmkit.train.loss.reference_loss_sum`, the formula the trainer used before: lm_head over
           every position, an fp32 upcast, the shifted slice reshaped, cross-entropy;
- chunked: `glmkit.train.loss.next_token_loss_sum`, what the trainer uses now: lm_head and the
           cross-entropy a chunk of tokens at a time, recomputed in backward.

Both get the same final hidden states [1, T, H] (requiring grad, as under LoRA) and a frozen
lm_head [V, H], like the kit's. Each variant runs in a fresh process, so nothing one
allocated is cached for the other; its peak is the growth of the process's peak resident
memory (VmHWM, reset through /proc/self/clear_refs just before) during the loss forward +
backward, over the resident size it started from (inputs allocated and touched). Tensors this large are mmapped by the C allocator and returned to
the system when freed, so the resident peak is the live-tensor peak. A third process
compares the two losses and the gradients w.r.t. the hidden states.

    .venv/bin/python bench/bench_loss_memory.py --tokens 1024 --hidden 1024 --vocab 151552 \\
        --out bench/results/loss_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import benchlib


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="T: tokens in the micro-batch")
    p.add_argument("--hidden", type=int, default=1024, help="H: hidden size")
    p.add_argument("--vocab", type=int, default=151552, help="V: vocabulary (GLM-4.5-Air: 151552)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--chunk-tokens", type=int, default=None, help="default: glmkit.train.loss.chunk_tokens_for(V)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=benchlib.default_out("loss_memory"))
    p.add_argument("--worker", choices=["full", "chunked", "compare"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def reset_high_water_mark() -> None:
    """Set VmHWM back to the current resident size (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def resident() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def high_water_mark() -> int:
    """VmHWM of this process, bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def inputs(args):
    import torch

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, dtype=dtype).requires_grad_(False)
    head.weight.copy_(torch.randn(args.vocab, args.hidden, generator=g, dtype=dtype) * args.hidden ** -0.5)
    hidden = torch.randn(1, args.tokens, args.hidden, generator=g, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=g)
    labels[0, ::97] = -100  # a few positions with no target, as at document starts
    return hidden, head, labels


def run_variant(name: str, hidden, head, labels, chunk_tokens):
    from glmkit.train.loss import next_token_loss_sum, reference_loss_sum

    if name == "full":
        loss = reference_loss_sum(hidden, head, labels)
    else:
        loss = next_token_loss_sum(hidden, head, labels, chunk_tokens)
    loss.backward()
    return loss.detach()


def worker(args) -> dict:

    benchlib.set_threads(args.threads)
    hidden, head, labels = inputs(args)
    if args.worker == "compare":
        losses, grads = {}, {}
        for name in ("full", "chunked"):
            hidden.grad = None
            losses[name] = run_variant(name, hidden, head, labels, args.chunk_tokens).double()
            grads[name] = hidden.grad.double().clone()
        return {"full_loss": losses["full"].item(), "chunked_loss": losses["chunked"].item(),
                "max_abs_loss_diff": (losses["full"] - losses["chunked"]).abs().item(),
                "max_abs_grad_diff": (grads["full"] - grads["chunked"]).abs().max().item(),
                "max_abs_grad": grads["full"].abs().max().item()}
    # Warm up the kernels on a few rows, so their one-off allocations are in the baseline.
    run_variant(args.worker, hidden[:, :8].detach().requires_grad_(True), head, labels[:, :8], args.chunk_tokens)
    reset_high_water_mark()
    before = resident()
    run_variant(args.worker, hidden, head, labels, args.chunk_tokens)
    return {"peak_bytes": high_water_mark() - before, "baseline_bytes": before}


def spawn(args, role: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", role, "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype,
               "--threads", str(args.threads)]
    if args.chunk_tokens:
        command += ["--chunk-tokens", str(args.chunk_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{role} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.quiet()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from glmkit.train.loss import chunk_tokens_for

    chunk = args.chunk_tokens or chunk_tokens_for(args.vocab)
    full, chunked, compare = spawn(args, "full"), spawn(args, "chunked"), spawn(args, "compare")
    logits_fp32 = args.tokens * args.vocab * 4
    result = {
        "benchmark": "loss_memory",
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": benchlib.machine_info(),
        "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
        "chunk_tokens": chunk,
        "full_peak_bytes": full["peak_bytes"],
        "chunked_peak_bytes": chunked["peak_bytes"],
        "chunked_over_full": chunked["peak_bytes"] / full["peak_bytes"],
        "full_logits_fp32_bytes": logits_fp32,
        **{k: compare[k] for k in ("max_abs_loss_diff", "max_abs_grad_diff", "full_loss", "chunked_loss",
                                   "max_abs_grad")},
        "method": "peak resident memory (VmHWM, reset first) growth during one loss forward + backward, each variant in a "
                  "fresh process, inputs allocated before the baseline",
    }
    print(benchlib.table(["loss", "peak bytes", "GB", "x full fp32 logits"], [
        ["full (before)", f"{full['peak_bytes']:,}", f"{full['peak_bytes'] / 1e9:.3f}",
         f"{full['peak_bytes'] / logits_fp32:.2f}"],
        [f"chunked ({chunk} tokens)", f"{chunked['peak_bytes']:,}", f"{chunked['peak_bytes'] / 1e9:.3f}",
         f"{chunked['peak_bytes'] / logits_fp32:.2f}"],
    ]))
    print(f"chunked / full = {result['chunked_over_full']:.3f}; |loss diff| {result['max_abs_loss_diff']:.3g} "
          f"(loss {result['full_loss']:.6g}), max |grad diff| {result['max_abs_grad_diff']:.3g} "
          f"(max |grad| {result['max_abs_grad']:.3g})")
    benchlib.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
