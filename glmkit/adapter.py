"""Using a trained adapter: merge it into the bf16 base, or generate a continuation with it."""

from __future__ import annotations

import os

import torch


def load_base_with_adapter(model_dir: str, adapter_dir: str, dtype=torch.bfloat16):
    """The base model in `dtype` (not 4-bit: merging needs real weights) with the adapter on top."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json; point --adapter at a checkpoint "
                                f"folder or paths.best_adapter_dir")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if os.path.isfile(
        os.path.join(adapter_dir, "tokenizer_config.json")) else model_dir)
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def merge(model_dir: str, adapter_dir: str, out_dir: str, dtype=torch.bfloat16) -> str:
    """Fold the LoRA deltas into the base weights and save a standard transformers checkpoint."""
    model, tokenizer = load_base_with_adapter(model_dir, adapter_dir, dtype)
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def sample(model_dir: str, adapter_dir: str, prompt: str, max_new_tokens: int = 40, dtype=torch.bfloat16) -> str:
    """Greedy continuation of `prompt` by base + adapter (deterministic, so it is testable)."""
    model, tokenizer = load_base_with_adapter(model_dir, adapter_dir, dtype)
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
