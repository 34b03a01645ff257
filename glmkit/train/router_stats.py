"""Expert usage from the router's real top-k choices.

GLM-4.5-Air routes by sigmoid scores plus a correction bias and returns no auxiliary
loss, so load balance has to be read off the choices themselves. A forward hook on each
router records which experts its tokens went to. Gradient checkpointing runs each
forward twice (once more in backward), so a hook only *overwrites* the counts of the
current micro-batch; the loop commits them once per micro-batch. Evaluation passes
(model.eval()) are not counted. Counts stay on the device until a record is written.

The counts of an interval still open at a checkpoint are part of the training state: they
are summed onto the main process and saved, so the first record after a resume covers the
same steps and tokens as in an uninterrupted run.
"""

from __future__ import annotations

import math

import torch


class RouterStats:
    def __init__(self, model, is_main_process: bool = True):
        self.is_main_process = is_main_process
        self.routers = [(index, layer.mlp.gate) for index, layer in enumerate(_decoder_layers(model))
                        if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k")]
        self.layer_ids = [index for index, _ in self.routers]
        self.num_experts = self.routers[0][1].num_experts if self.routers else 0
        self.top_k = self.routers[0][1].top_k if self.routers else 0
        self.token_mask: torch.Tensor | None = None
        self._current: dict[int, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None
        self.tokens = 0
        self._handles = [router.register_forward_hook(self._hook(slot)) for slot, (_, router) in enumerate(self.routers)]

    def _hook(self, slot: int):
        def record(module, inputs, outputs):
            if not module.training:
                return
            chosen = outputs[2]  # (router_logits, topk_weights, topk_indices)
            if self.token_mask is not None:
                chosen = chosen[self.token_mask.reshape(-1).to(chosen.device)]
            self._current[slot] = torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
        return record

    def begin_microbatch(self, token_mask: torch.Tensor) -> None:
        """Tell the hooks which positions are real tokens (padding is not routed traffic)."""
        self.token_mask = token_mask
        self._current.clear()

    def commit_microbatch(self) -> None:
        if not self._current:
            return
        current = torch.stack([self._current[slot] for slot in range(len(self.routers))])
        self.counts = current if self.counts is None else self.counts + current
        self.tokens += int(self.token_mask.sum()) if self.token_mask is not None else 0
        self._current.clear()

    def take(self, reduce=None) -> tuple[torch.Tensor, int]:
        """(counts [layers, experts], tokens) since the last call, summed over processes by `reduce`."""
        counts = self.counts if self.counts is not None else torch.zeros(
            len(self.routers), self.num_experts, dtype=torch.long, device=self._device())
        tokens = torch.tensor([self.tokens], dtype=torch.long, device=counts.device)
        if reduce is not None:
            counts, tokens = reduce(counts), reduce(tokens)
        self.counts, self.tokens = None, 0
        return counts.cpu(), int(tokens.item())

    def fold_onto_main(self, reduce) -> None:
        """Sum the open interval over processes into the main one (others drop theirs); totals are unchanged."""
        counts, tokens = self.take(reduce)
        if self.is_main_process and tokens:
            self.counts, self.tokens = counts.to(self._device()), tokens

    def state_dict(self) -> dict:
        return {"counts": None if self.counts is None else self.counts.cpu(), "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        # Every process reads the main process's file; only the main one keeps the folded counts.
        if self.is_main_process and state["counts"] is not None:
            self.counts, self.tokens = state["counts"].to(self._device()), int(state["tokens"])
        else:
            self.counts, self.tokens = None, 0

    def _device(self):
        return self.routers[0][1].weight.device if self.routers else "cpu"

    def record(self, counts: torch.Tensor, tokens: int) -> dict:
        """The expert_usage_log.jsonl payload for one interval."""
        layers = []
        for layer_id, row in zip(self.layer_ids, counts.tolist()):
            layers.append({"layer": layer_id, "counts": row, **balance(row)})
        return {"interval_tokens": tokens, "num_experts": self.num_experts, "top_k": self.top_k, "layers": layers}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def balance(counts: list[int]) -> dict:
    """max/mean load, entropy normalised to [0, 1] (1 = perfectly even), and unused experts."""
    total = sum(counts)
    n = len(counts)
    if total == 0:
        return {"max_over_mean": 0.0, "entropy": 0.0, "dead_experts": list(range(n))}
    mean = total / n
    entropy = -sum((c / total) * math.log(c / total) for c in counts if c) / math.log(n) if n > 1 else 1.0
    return {"max_over_mean": round(max(counts) / mean, 6), "entropy": round(entropy, 6),
            "dead_experts": [i for i, c in enumerate(counts) if c == 0]}


def _decoder_layers(model):
    """The decoder's ModuleList, wherever peft/accelerate wrappers have put it."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError("no decoder layers found in the model")
