"""One rank of the sequence-parallel parity checks (tests/test_sequence_parallel.py), under torch.distributed.run.

Every rank computes the one-process reference itself, on a model of its own with no collective, then the same
with distributed.sequence_parallel P over the launched processes (gloo, CPU), and writes the largest relative
differences to <out>/rank<R>.json; the test holds them to 1e-5.

- attention: the all-to-all around varlen attention against varlen attention over the whole rows (packed
  documents crossing the slices' boundaries, grouped-query heads): output and q, k, v gradients.
- model: the 4-bit model with LoRA on attention and the routed experts, gradient checkpointing on, wrapped in
  DDP or sharded by FSDP2 over every process, P = 2 (two groups: DDP/FSDP across them) and P = 4: the step's
  loss and every LoRA gradient, the loss scaled as train_step scales it; then an eval of uneven shards
  (glmkit/train/evaluation.py) against the reference's.

    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/sequence_parallel_worker.py \\
        --config CONFIG --out FOLDER
"""

from __future__ import annotations

import argparse
import json
import os

import torch

ROW = 32           # tokens per row: slices of 16 (P=2) or 8 (P=4)
DOC_LENGTHS = [5, 21, 3, 40, 11, 9, 30, 9]   # packed into 4 rows: documents cross slice and row boundaries
EVAL_DOC_LENGTHS = [17, 20, 50, 3]           # 3 rows: uneven shards for two groups


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale or 1.0)


def attention_parity(layout) -> dict:
    from glmkit.model.attention import packed_segments, varlen_attention_forward

    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim = 2, 8, 4, 8
    positions = torch.tensor([list(range(5)) + list(range(19)) + list(range(8)),
                              list(range(9)) + list(range(23))])
    cu_seqlens, longest = packed_segments(positions)
    q, k, v = (torch.randn(rows, h, ROW, dim, generator=generator, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    weights = torch.randn(rows, ROW, heads, dim, generator=generator)
    whole, _ = varlen_attention_forward(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu_seqlens,
                                        max_length_q=longest)
    whole_grads = torch.autograd.grad((whole * weights).sum(), (q, k, v))
    width = ROW // layout.size
    cut = slice(layout.rank * width, (layout.rank + 1) * width)
    mine = [t[:, :, cut].detach().requires_grad_() for t in (q, k, v)]
    out, _ = varlen_attention_forward(None, *mine, None, scaling=0.3, cu_seq_lens_q=cu_seqlens, max_length_q=longest,
                                      sequence_group=layout.group)
    grads = torch.autograd.grad((out * weights[:, cut]).sum(), mine)
    return {"output": relative(out, whole[:, cut]),
            **{f"grad_{name}": relative(g, w[:, :, cut]) for name, g, w in zip("qkv", grads, whole_grads)}}


def rows_of(lengths, seed):
    from glmkit.data.rows import pack_rows

    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 2000, (n,), generator=generator).tolist() for n in lengths]
    packed = pack_rows(docs, ROW, 1)
    return [{"input_ids": r, "position_ids": p} for r, p in zip(packed["input_ids"], packed["position_ids"])]


def lora_model(cfg):
    """The kit's 4-bit model with LoRA, the same random adapter on every rank (lora_B too, so every LoRA
    matrix gets a gradient)."""
    from glmkit.model.load import load_model, prepare_for_training

    model = prepare_for_training(load_model(cfg), cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            grads[name.removeprefix("module.")] = grad.detach().clone()
    return grads


def count_exchanges():
    """Wrap the all-to-all so the test can see it ran (forward, the recompute under checkpointing, backward)."""
    from glmkit.model import sequence_parallel as exchanges

    calls = {"n": 0}
    plain = exchanges.exchange

    def counted(*args, **kwargs):
        calls["n"] += 1
        return plain(*args, **kwargs)

    exchanges.exchange = counted
    return calls


def model_parity(cfg, accelerator, layout, strategy: str, reference: dict, calls) -> dict:
    from glmkit.data.rows import make_collator
    from glmkit.train.ddp import exclude_frozen_from_sync
    from glmkit.train.evaluation import evaluate
    from glmkit.train.fsdp import shard_model
    from glmkit.train.step import loss_sum, target_tokens

    collate = make_collator(reference["tokenizer"], cfg)
    model = lora_model(cfg)
    if strategy == "fsdp":
        model = shard_model(model, accelerator.device)
    else:
        exclude_frozen_from_sync(model)
        model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()
    rows = reference["rows"]
    per_group = len(rows) // layout.data_groups
    batch = layout.local_batch(collate(rows[layout.data_rank * per_group:(layout.data_rank + 1) * per_group]))
    world = accelerator.num_processes
    tokens = accelerator.reduce(torch.tensor(target_tokens(batch)), "sum")
    before = calls["n"]
    loss = loss_sum(model, batch)
    (loss * world / tokens).backward()  # as train_step scales it (one micro-batch)
    exchanges = calls["n"] - before
    step_loss = accelerator.reduce(loss.detach().double(), "sum") / tokens
    grads = lora_grads(model)
    result = {"loss": abs(step_loss.item() - reference["loss"]) / reference["loss"],
              "tokens": int(tokens.item()) - reference["tokens"], "exchanges": exchanges,
              "grads": max(relative(grads[name], want) for name, want in reference["grads"].items()),
              "grads_compared": len(grads.keys() & reference["grads"].keys())}
    evaluated = evaluate(model, reference["eval_rows"], collate, accelerator, 1, layout=layout)
    result["eval_loss"] = abs(evaluated.val_loss - reference["eval_loss"]) / reference["eval_loss"]
    result["eval_tokens"] = evaluated.val_tokens - reference["eval_tokens"]
    return result


def one_process_reference(cfg) -> dict:
    """Every row on this process alone: the loss, tokens and gradients of the step, and the eval."""
    from transformers import AutoTokenizer

    from glmkit.data.rows import make_collator
    from glmkit.train.step import loss_sum, target_tokens

    tokenizer = AutoTokenizer.from_pretrained(cfg.paths.model_dir)
    collate = make_collator(tokenizer, cfg)
    model = lora_model(cfg)
    model.train()
    rows, eval_rows = rows_of(DOC_LENGTHS, 1), rows_of(EVAL_DOC_LENGTHS, 2)
    batch = collate(rows)
    tokens = target_tokens(batch)
    loss = loss_sum(model, batch)
    (loss / tokens).backward()
    model.eval()
    with torch.no_grad():
        eval_sum = sum(loss_sum(model, collate([row])).item() for row in eval_rows)
    eval_tokens = sum(target_tokens(collate([row])) for row in eval_rows)
    return {"tokenizer": tokenizer, "rows": rows, "eval_rows": eval_rows, "loss": loss.item() / tokens,
            "tokens": tokens, "grads": lora_grads(model), "eval_loss": eval_sum / eval_tokens,
            "eval_tokens": eval_tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from accelerate import Accelerator

    from glmkit.config.load import load_config
    from glmkit.model.load import load_model_config
    from glmkit.train.sequence_parallel import setup_sequence_parallel

    accelerator = Accelerator(cpu=True)
    base = load_config(args.config)
    reference = one_process_reference(base)
    calls = count_exchanges()
    results = {}
    for size in (2, 4):
        cfg = load_config(args.config, [f"distributed.sequence_parallel={size}"])
        layout = setup_sequence_parallel(cfg, accelerator)
        results[f"attention P={size}"] = attention_parity(layout)
        for strategy in ("ddp", "fsdp"):
            results[f"{strategy} P={size}"] = model_parity(cfg, accelerator, layout, strategy, reference, calls)
    with open(os.path.join(args.out, f"rank{accelerator.process_index}.json"), "w", encoding="utf-8") as fh:
        json.dump({"layers": load_model_config(base.paths.model_dir).num_hidden_layers, **results}, fh, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
