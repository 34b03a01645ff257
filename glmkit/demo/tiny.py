"""An offline, CPU-sized GLM-4.5-Air (or GLM-4.6 / 4.7 / 4.7-Flash): same class, same checkpoint layout, minutes not days.

The checkpoint is a `Glm4MoeForCausalLM` with a dense first layer, sigmoid-routed experts
plus a shared expert, partial rotary embeddings and grouped-query attention, saved as
sharded safetensors with an index exactly like the real one (per-expert tensors, which
the kit's loader fuses and quantizes), and one multi-token-prediction (MTP) layer after the
decoder layers, at `model.layers.<num_hidden_layers>.*` as on the Hub (glmkit/model/mtp.py).
Its tokenizer is a byte-level BPE trained on the demo corpus on the spot, with GLM-4.5's control
tokens (`[gMASK]<sop>`, the role markers `<|system|>` `<|user|>` `<|assistant|>` `<|observation|>`,
`<think>` `</think>` and the tool-call markup) as single tokens, and a chat template of GLM-4.5's
shape written for it (`chat_template.jinja`, as on the Hub): chat data is rendered and masked
offline exactly as it would be for the real model. The same seed gives the same files.

The MTP layer's weights are drawn from their own seeded generator after everything else, so
the trunk is the same to the bit as a tiny model without one.

Variants (`download_model.py --tiny [VARIANT]`): `air`, GLM-4.5-Air's shape (one dense layer, no
QK-norm; its MTP layer keeps copies of the embedding and lm_head, as GLM-4.5-Air's does);
`glm4.6` and `glm4.7`, GLM-4.6's / GLM-4.7's / GLM-4.5's (the first three layers dense, QK-norm
on every layer's queries and keys, routed_scaling_factor 2.5; an MTP layer without those
copies, the other layout on the Hub), so the kit's loader, LoRA targets, FSDP units and memory
plan are exercised on that architecture too; `air-8kv`, `air` with GLM-4.5-Air's
8 KV heads (16 query heads of 16 dims), which sequence parallelism can split 2, 4 or 8 ways.
`glm4.7-flash`: GLM-4.7-Flash's (transformers'
`Glm4MoeLiteForCausalLM`): the same MoE half, with multi-head latent attention (MLA: `q_a_proj` ->
`q_b_proj` for the queries, `kv_a_proj_with_mqa` -> `kv_b_proj` for keys and values from one latent,
`o_proj`; no bias, every head its own keys), q/k head dim 24 + 8 = v head dim 32 as the real
192 + 64 = 256; its MTP layer at `model.layers.3.*` with the embedding and lm_head copies, as on the
Hub. `glm4.7-flash-narrow-v`: the same with v head dim 16 against q/k's 32 (DeepSeek-V3's 128 against
192), which the class allows and the kit's attention must handle.
"""

from __future__ import annotations

import os

import torch

from glmkit.demo.corpus import iter_documents
from glmkit.model.load import DEMO_MODEL_KEY

TINY_VOCAB_SIZE = 2048
# variant -> the keys where it differs from GLM-4.5-Air's shape
GLM46_SHAPE = {"num_hidden_layers": 5, "first_k_dense_replace": 3, "use_qk_norm": True, "routed_scaling_factor": 2.5}
# GLM-4.7-Flash's published config at tiny size: MLA ranks in the real ratio to the hidden size (768 and 512 of 2048),
# as many key/value heads as query heads, full rotary on the rope part, no attention bias, scaling 1.8.
FLASH_SHAPE = {"model_type": "glm4_moe_lite", "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32,
               "qk_nope_head_dim": 24, "qk_rope_head_dim": 8, "v_head_dim": 32, "attention_bias": False,
               "partial_rotary_factor": 1.0, "routed_scaling_factor": 1.8, "num_nextn_predict_layers": 1}
TINY_VARIANTS = {
    "air": {},
    "glm4.6": GLM46_SHAPE,
    "glm4.7": GLM46_SHAPE,  # GLM-4.7 has GLM-4.6's architecture
    "air-8kv": {"num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 16},
    "glm4.7-flash": FLASH_SHAPE,
    "glm4.7-flash-narrow-v": {**FLASH_SHAPE, "v_head_dim": 16},
}
# Variants whose MTP layer stores copies of the trunk's embedding and lm_head (GLM-4.5-Air's and GLM-4.7-Flash's
# checkpoints do).
MTP_WITH_TRUNK_COPIES = {"air", "air-8kv", "glm4.7-flash", "glm4.7-flash-narrow-v"}
# Added to the seed for the MTP layer's own generator.
MTP_SEED_OFFSET = 1_000_003
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# GLM-4.5's control tokens: special (decode(skip_special_tokens=True) drops them), one token each.
CONTROL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# GLM-4.5's markup tokens: added as single tokens but not special, as in its tokenizer, so decoded text
# keeps them (reasoning and tool-call parsers read them).
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                 "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink"]
# GLM-4.5's generation_config.json stops at EOS and at the markers that end an assistant turn.
STOP_TOKENS = [EOS_TOKEN, "<|user|>", "<|observation|>"]

# GLM-4.5's conversation format, written for the tiny model (it renders what GLM-4.5-Air's own template
# renders for the same messages and tools). No end-of-turn token: the next role marker, or EOS, ends a turn.
# An assistant turn is `\n<think>REASONING</think>` after the last user message and an empty `\n<think></think>`
# before it, then `\n` + its content, then its tool calls in GLM's XML.
TINY_CHAT_TEMPLATE = """\
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part is mapping and part.type == 'text' -%}{{ part.text }}{%- elif part is string -%}{{ part }}{%- endif -%}
{%- endfor -%}
{%- elif content is not none -%}{{ content }}
{%- endif -%}
{%- endmacro -%}
[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call>
{%- endif -%}
{%- set last = namespace(user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set last.user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
{{ '<|system|>\\n' + text(m.content) }}
{%- elif m.role == 'user' -%}
{%- set said = text(m.content) -%}
{{ '<|user|>\\n' + said }}
{%- if enable_thinking is defined and not enable_thinking and not said.endswith('/nothink') -%}/nothink{%- endif -%}
{%- elif m.role == 'assistant' -%}
{%- set said = text(m.content) -%}
{%- set thought = '' -%}
{%- if m.reasoning_content is string -%}
{%- set thought = m.reasoning_content -%}
{%- elif '</think>' in said -%}
{%- set thought = said.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}
{%- set said = said.split('</think>')[-1].lstrip('\\n') -%}
{%- endif -%}
{{ '<|assistant|>' }}
{%- if loop.index0 > last.user and thought -%}
{{ '\\n<think>' + thought.strip() + '</think>' }}
{%- else -%}
{{ '\\n<think></think>' }}
{%- endif -%}
{%- if said.strip() -%}{{ '\\n' + said.strip() }}{%- endif -%}
{%- for call in m.tool_calls or [] -%}
{%- set call = call.function if call.function else call -%}
{{ '\\n<tool_call>' + call.name + '\\n' }}
{%- for key, value in call.arguments.items() -%}
{{ '<arg_key>' + key + '</arg_key>\\n<arg_value>' }}
{{- value if value is string else value | tojson(ensure_ascii=False) }}{{ '</arg_value>\\n' }}
{%- endfor -%}
{{ '</tool_call>' }}
{%- endfor -%}
{%- elif m.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}<|observation|>{%- endif -%}
{{ '\\n<tool_response>\\n' + text(m.content) + '\\n</tool_response>' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{%- if enable_thinking is defined and not enable_thinking -%}{{ '\\n<think></think>' }}{%- endif -%}
{%- endif -%}
"""


def model_class(model_type: str):
    """The transformers causal-LM class of a model type the tiny checkpoints come in."""
    from transformers import Glm4MoeForCausalLM, Glm4MoeLiteForCausalLM

    return {"glm4_moe": Glm4MoeForCausalLM, "glm4_moe_lite": Glm4MoeLiteForCausalLM}[model_type]


def tiny_model_config(vocab_size: int, eos_token_id: int, pad_token_id: int, variant: str = "air"):

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
    differences = dict(TINY_VARIANTS[variant])
    model_type = differences.pop("model_type", "glm4_moe")
    if model_type == "glm4_moe_lite":
        del shape["head_dim"]  # Glm4MoeLiteConfig reads head_dim as qk_rope_head_dim; its head dims are given above
    config = model_class(model_type).config_class(**{**shape, **differences})
    setattr(config, DEMO_MODEL_KEY, True)  # config.json says it: tools tell users its text is noise by design
    return config


def train_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    """A byte-level BPE trained on the demo corpus, GLM-4.5's control and markup tokens added as single
    tokens (EOS and pad first: ids 0 and 1), wrapped as a transformers fast tokenizer with the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKUP_TOKENS),  # the markup tokens come after: vocab_size in all
        special_tokens=[EOS_TOKEN, PAD_TOKEN, *CONTROL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_documents(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in MARKUP_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   model_max_length=8192, chat_template=TINY_CHAT_TEMPLATE)


def write_tiny_checkpoint(model_dir: str, seed: int = 0, max_shard_size: str = "200KB", variant: str = "air",
                          tokenizer_from: str | None = None) -> None:
    """Write the tiny model + tokenizer into `model_dir`, laid out like the Hub checkpoint.

    `tokenizer_from`: a folder holding a tiny checkpoint's tokenizer, reused instead of training one."""
    from transformers import AutoTokenizer

    if variant not in TINY_VARIANTS:
        raise ValueError(f"no tiny variant {variant!r}; there are {', '.join(TINY_VARIANTS)}")
    os.makedirs(model_dir, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from else train_tokenizer()
    config = tiny_model_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, variant)
    torch.manual_seed(seed)
    model = model_class(config.model_type)(config).to(torch.bfloat16)
    save_with_uneven_routing(model, tokenizer, model_dir, max_shard_size, mtp_seed=seed + MTP_SEED_OFFSET,
                             mtp_trunk_copies=variant in MTP_WITH_TRUNK_COPIES)


def save_with_uneven_routing(model, tokenizer, model_dir: str, max_shard_size: str, mtp_seed: int = MTP_SEED_OFFSET,
                             mtp_trunk_copies: bool = True) -> None:
    """Give the routers a trained-looking correction bias, then save model + tokenizer in sharded Hub layout,
    with the MTP layer(s) the config announces (drawn from `mtp_seed`, after everything else)."""
    with torch.no_grad():
        # A small spread in the correction bias, as a trained router has, so routing is uneven.
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):  # the MoE layers
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.01)
    mtp_tensors = mtp_layer_tensors(model, mtp_seed, mtp_trunk_copies)
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    model.save_pretrained(model_dir, max_shard_size=max_shard_size)
    if mtp_tensors:
        add_to_checkpoint(model_dir, mtp_tensors, max_shard_size)
    tokenizer.save_pretrained(model_dir)


def mtp_layer_tensors(model, seed: int, trunk_copies: bool) -> dict[str, torch.Tensor]:
    """The MTP layer(s) of `model`'s config, Hub layout, drawn from a generator of their own ({}: none announced).

    Built on the meta device and filled here, in name order (transformers' own initialisation visits modules in
    an order that changes with PYTHONHASHSEED), the way transformers initialises a Glm4Moe layer: matrices and
    experts normal(0, initializer_range), norms 1, biases 0, and the router's correction bias a small spread.
    The global RNG is not touched."""
    from glmkit.model.mtp import build_mtp_layers, hub_tensors

    with torch.device("meta"):
        layers = build_mtp_layers(model)
    if layers is None:
        return {}
    layers = layers.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, tensor in sorted([*layers.named_parameters(), *layers.named_buffers()]):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)
            elif tensor.dim() >= 2:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
            else:
                tensor.fill_(1.0 if "norm" in name else 0.0)
    tensors = hub_tensors(layers, model.config.num_hidden_layers)
    if trunk_copies:
        for k in range(len(layers)):
            prefix = f"model.layers.{model.config.num_hidden_layers + k}"
            tensors[f"{prefix}.embed_tokens.weight"] = model.get_input_embeddings().weight.detach().clone()
            tensors[f"{prefix}.shared_head.head.weight"] = model.get_output_embeddings().weight.detach().clone()
    return tensors


def add_to_checkpoint(model_dir: str, tensors: dict[str, torch.Tensor], max_shard_size: str) -> None:
    """Rewrite the checkpoint in `model_dir` with `tensors` after its own, resharded and reindexed."""
    import json

    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        os.remove(index)
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(model_dir, name)))
        os.remove(os.path.join(model_dir, name))
    save_torch_state_dict({**state, **tensors}, model_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})
