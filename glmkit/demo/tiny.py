"""An offline, CPU-sized GLM-4.5-Air (or GLM-4.6): same class, same checkpoint layout, minutes not days.

The checkpoint is a `Glm4MoeForCausalLM` with a dense first layer, sigmoid-routed experts
plus a shared expert, partial rotary embeddings and grouped-query attention, saved as
sharded safetensors with an index exactly like the real one (per-expert tensors, which
the kit's loader fuses and quantizes). Its tokenizer is a byte-level BPE trained on the
demo corpus on the spot. The same seed gives the same files.

Variants (`download_model.py --tiny [VARIANT]`): `air`, GLM-4.5-Air's shape (one dense layer, no
QK-norm); `glm4.6`, GLM-4.6's / GLM-4.5's (the first three layers dense, QK-norm on every
layer's queries and keys, routed_scaling_factor 2.5), so the kit's loader, LoRA targets, FSDP
units and memory plan are exercised on that architecture too; `air-8kv`, `air` with GLM-4.5-Air's
8 KV heads (16 query heads of 16 dims), which sequence parallelism can split 2, 4 or 8 ways.
"""

from __future__ import annotations

import os

import torch

from glmkit.demo.corpus import iter_documents

TINY_VOCAB_SIZE = 2048
# variant -> the keys where it differs from GLM-4.5-Air's shape
TINY_VARIANTS = {
    "air": {},
    "glm4.6": {"num_hidden_layers": 5, "first_k_dense_replace": 3, "use_qk_norm": True, "routed_scaling_factor": 2.5},
    "air-8kv": {"num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 16},
}
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def tiny_model_config(vocab_size: int, eos_token_id: int, pad_token_id: int, variant: str = "air"):
    from transformers import Glm4MoeConfig

    # GLM-4.5-Air's structure (first layer dense, 1 shared + routed experts, top-k over
    # sigmoid scores, partial rotary 0.5, GQA, QKV bias) at a size a laptop CPU trains.
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        attention_bias=True,
        partial_rotary_factor=0.5,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    return Glm4MoeConfig(**{**shape, **TINY_VARIANTS[variant]})


def train_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    """A byte-level BPE trained on the demo corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_documents(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   model_max_length=8192)


def write_tiny_checkpoint(model_dir: str, seed: int = 0, max_shard_size: str = "200KB", variant: str = "air",
                          tokenizer_from: str | None = None) -> None:
    """Write the tiny model + tokenizer into `model_dir`, laid out like the Hub checkpoint.

    `tokenizer_from`: a folder holding a tiny checkpoint's tokenizer, reused instead of training one."""
    from transformers import AutoTokenizer, Glm4MoeForCausalLM

    if variant not in TINY_VARIANTS:
        raise ValueError(f"no tiny variant {variant!r}; there are {', '.join(TINY_VARIANTS)}")
    os.makedirs(model_dir, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from else train_tokenizer()
    config = tiny_model_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, variant)
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config).to(torch.bfloat16)
    save_with_uneven_routing(model, tokenizer, model_dir, max_shard_size)


def save_with_uneven_routing(model, tokenizer, model_dir: str, max_shard_size: str) -> None:
    """Give the routers a trained-looking correction bias, then save model + tokenizer in sharded Hub layout."""
    with torch.no_grad():
        # A small spread in the correction bias, as a trained router has, so routing is uneven.
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.01)
    model.generation_config.do_sample = False
    model.save_pretrained(model_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(model_dir)
