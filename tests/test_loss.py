"""The chunked loss: same sum and gradients as the full-vocabulary formula, never a full logits tensor."""

import pytest
import torch
from conftest import model_with_random_adapter
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from glmkit.data.rows import IGNORE_INDEX, Collator, pack_rows
from glmkit.train.loss import (
    ChunkedLinearCrossEntropy,
    causal_lm_loss_sum,
    linear_cross_entropy_sum,
    next_token_loss_sum,
    reference_loss_sum,
)

HIDDEN, VOCAB = 24, 97


def assert_close_rel(got, want, rel=1e-5, name=""):
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= rel * max(scale, 1e-12), name


def example(rows=3, length=29, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(HIDDEN, VOCAB, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=g))
    hidden = torch.randn(rows, length, HIDDEN, generator=g, requires_grad=True)
    labels = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < 0.2] = IGNORE_INDEX  # document starts, padding
    return hidden, head, labels


def grads_of(loss, tensors):
    (loss * 2.5).backward()  # the trainer scales the summed loss before backward
    found = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return found


@pytest.mark.parametrize("chunk", [1, 7, 40, 10_000])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_equals_full_loss_and_gradients(chunk, bias):
    hidden, head, labels = example(bias=bias)
    params = [hidden, head.weight] + ([head.bias] if bias else [])  # a trainable head gets its gradient too
    full = reference_loss_sum(hidden, head, labels)
    full_grads = grads_of(full, params)
    chunked = next_token_loss_sum(hidden, head, labels, chunk_tokens=chunk)
    chunked_grads = grads_of(chunked, params)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    for got, want, name in zip(chunked_grads, full_grads, ["hidden", "weight", "bias"]):
        assert_close_rel(got, want, name=name)


def test_frozen_head_gets_no_gradient_and_no_target_gives_zero():
    hidden, head, labels = example()
    head.requires_grad_(False)
    loss = next_token_loss_sum(hidden, head, labels, chunk_tokens=5)
    loss.backward()
    assert head.weight.grad is None and hidden.grad is not None
    assert hidden.grad[:, -1].abs().sum() == 0  # the last position predicts nothing
    empty = next_token_loss_sum(hidden, head, torch.full_like(labels, IGNORE_INDEX))
    assert empty.item() == 0.0


def test_a_head_that_is_not_a_plain_linear_is_checkpointed_per_chunk():
    """LoRA on lm_head, say: the same chunks, each recomputed by checkpointing."""
    hidden, linear, labels = example()
    head = nn.Sequential(linear)
    params = [hidden, linear.weight, linear.bias]
    full_grads = grads_of(reference_loss_sum(hidden, head, labels), params)
    loss = next_token_loss_sum(hidden, head, labels, chunk_tokens=6)
    assert loss.item() == pytest.approx(reference_loss_sum(hidden, head, labels).item(), rel=1e-5)
    for got, want in zip(grads_of(loss, params), full_grads):
        assert_close_rel(got, want)


class MostLogitRows(TorchDispatchMode):
    """The most rows of any vocabulary-wide tensor ([..., VOCAB]: logits, their upcasts and gradients) an op
    allocates; views and in-place results share an input's memory and are not counted."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB
                    and t.untyped_storage().data_ptr() not in inputs):
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


def test_never_a_full_vocabulary_logits_tensor():
    hidden, head, labels = example(rows=2, length=200)
    head.requires_grad_(False)
    with MostLogitRows() as full:
        reference_loss_sum(hidden, head, labels).backward()
    with MostLogitRows() as chunked:
        next_token_loss_sum(hidden, head, labels, chunk_tokens=16).backward()
    assert full.rows >= 2 * 199
    assert chunked.rows == 16  # one chunk of logits at a time, forward and backward


def test_function_is_a_plain_sum_over_rows():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (10,), generator=g)
    targets[3] = IGNORE_INDEX
    torch.autograd.gradcheck(lambda h, w: ChunkedLinearCrossEntropy.apply(h, w, None, targets, 3), (hidden, weight))
    head = nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
    manual = sum(torch.logsumexp(hidden[i] @ weight.t(), 0) - (hidden[i] @ weight.t())[targets[i]]
                 for i in range(10) if targets[i] != IGNORE_INDEX)
    assert linear_cross_entropy_sum(hidden, head, targets, 4).item() == pytest.approx(manual.item(), rel=1e-6)


# ---------------------------------------------------------------------------
# Through the tiny model: the trainer's loss vs the old full-vocabulary loss
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_model(tmp_path_factory, tiny_model_dir, demo_corpus):
    return model_with_random_adapter(tmp_path_factory.mktemp("loss"), tiny_model_dir, demo_corpus)


def old_loss_sum(model, batch):
    """The trainer's loss before this change, verbatim: full logits from the model's own lm_head."""
    from glmkit.data.rows import model_inputs

    logits = model(**model_inputs(batch), use_cache=False).logits
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def model_loss_and_grads(model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("trainable_head", [False, True])
def test_model_loss_equals_the_full_loss(lora_model, trainable_head):
    model, cfg = lora_model
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, 2000, (n,), generator=generator).tolist() for n in (90, 200, 13, 60)]
    packed = pack_rows(docs, 128, 1)
    batch = Collator(1, True, "longest", 128, cfg.model.attn_implementation)(
        [{"input_ids": r, "position_ids": p} for r, p in zip(packed["input_ids"], packed["position_ids"])])
    head = model.get_output_embeddings()
    head.weight.requires_grad_(trainable_head)
    try:
        model.train()
        old, old_grads = model_loss_and_grads(model, batch, old_loss_sum)
        new, new_grads = model_loss_and_grads(model, batch, lambda m, b: causal_lm_loss_sum(m, b, chunk_tokens=50))
        with torch.no_grad():
            model.eval()
            assert causal_lm_loss_sum(model, batch).item() == pytest.approx(old_loss_sum(model, batch).item(), rel=1e-5)
    finally:
        head.weight.requires_grad_(False)
        head.weight.grad = None
    assert model.get_output_embeddings().forward.__func__ is nn.Linear.forward  # lm_head is whole again
    assert new == pytest.approx(old, rel=1e-5)
    assert new_grads.keys() == old_grads.keys()
    assert any("lm_head" in n for n in new_grads) == trainable_head
    for name, want in old_grads.items():
        assert_close_rel(new_grads[name], want, name=name)
