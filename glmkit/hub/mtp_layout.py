"""Does a checkpoint's config.json agree with its weights about the multi-token-prediction (MTP) layer?

GLM-4.5-Air, GLM-4.5, GLM-4.6, GLM-4.7 and GLM-4.7-Flash ship one MTP layer after their decoder layers, stored as
`model.layers.<num_hidden_layers>.*` and announced by `num_nextn_predict_layers: 1` in config.json.
vLLM and SGLang draft speculative tokens with it; transformers builds it for `generate(use_mtp=True)`.
A folder where the two disagree loads fine and fails later, far from the cause: a model saved by
`save_pretrained` keeps the announcement but drops the layer (transformers never loads it), so a
server started with MTP speculative decoding crashes on the missing weights, and the trainer would
have nothing to measure. The rule lives here, from config.json and the tensor names alone (no
weights read), for `download_model.py --verify-only`, the trainer and the merge.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

MTP_CONFIG_KEY = "num_nextn_predict_layers"
# transformers' Glm4MoeConfig: `num_mtp_layers` is an alias of num_nextn_predict_layers, 1 when absent. Its
# Glm4MoeLiteConfig (GLM-4.7-Flash) knows neither: there the key is read as written, 0 when absent.
MTP_CONFIG_ALIAS = "num_mtp_layers"
DEFAULT_MTP_LAYERS = {"glm4_moe": 1}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# A tensor every GLM MTP layer has and no decoder layer has: the projection of [embedding; hidden].
MTP_MARKER = "eh_proj.weight"


def announced_mtp_layers(config: dict) -> int:
    """How many MTP layers config.json announces, read the way transformers reads it."""
    default = DEFAULT_MTP_LAYERS.get(config.get("model_type"), 0)
    value = config.get(MTP_CONFIG_KEY, config.get(MTP_CONFIG_ALIAS, default))
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def stored_mtp_layers(tensor_names: Iterable[str], num_hidden_layers: int) -> list[int]:
    """The layer indices at or past num_hidden_layers that the weights hold (the MTP layers, if any)."""
    found = set()
    for name in tensor_names:
        match = _LAYER.match(name)
        if match and int(match.group(1)) >= num_hidden_layers:
            found.add(int(match.group(1)))
    return sorted(found)


def mtp_problem(config: dict, tensor_names: Iterable[str]) -> Optional[str]:
    """What is wrong with the MTP layer of a checkpoint (config.json vs its tensor names), with the fix; None: fine."""
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int):
        return None  # a config without it is reported by the config check
    names = set(tensor_names)
    announced = announced_mtp_layers(config)
    stored = stored_mtp_layers(names, layers)
    wanted = list(range(layers, layers + announced))
    if stored == wanted and all(f"model.layers.{i}.{MTP_MARKER}" in names for i in wanted):
        return None
    if not stored:
        return (f"announces {announced} MTP layer(s) ({MTP_CONFIG_KEY}: {announced}) but the weights hold none "
                f"(no model.layers.{layers}.*, as when a model is saved by transformers' save_pretrained, which "
                f"drops it): set {MTP_CONFIG_KEY} to 0 in config.json (no MTP speculative decoding, no acceptance "
                f"to measure), or download the original checkpoint")
    if not announced:
        return (f"announces no MTP layer ({MTP_CONFIG_KEY}: 0) but the weights hold "
                f"{_layer_list(stored)}: set {MTP_CONFIG_KEY} to {len(stored)} in config.json to use it")
    missing_marker = [i for i in stored if f"model.layers.{i}.{MTP_MARKER}" not in names]
    if missing_marker:
        return (f"model.layers.{missing_marker[0]}.* is past the {layers} decoder layers but has no {MTP_MARKER}, "
                f"so it is not an MTP layer; the weights do not match config.json: download the checkpoint again")
    return (f"announces {announced} MTP layer(s) ({MTP_CONFIG_KEY}: {announced}) but the weights hold "
            f"{_layer_list(stored)}: set {MTP_CONFIG_KEY} to {len(stored)} in config.json, or download the "
            f"checkpoint again")


def _layer_list(indices: list[int]) -> str:
    return ", ".join(f"model.layers.{i}.*" for i in indices)
