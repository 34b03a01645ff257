"""varlen attention: packed rows cut by segment boundaries, no mask, equal to the masked sdpa path."""

import pytest
import torch
import torch.nn.functional as F
from conftest import model_with_random_adapter

from glmkit.data.rows import IGNORE_INDEX, Collator, model_inputs, pack_rows
from glmkit.model import attention

ROW = 128
PAD = 1


def test_segments_of_a_packed_batch():
    # row 0: a document of 3, then one that spills into row 1; row 1: its rest, then a document of 1 and padding.
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, -1, -1]])
    cu_seqlens, longest = attention.packed_segments(positions)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 5, 7, 8, 10]
    assert int(longest) == 3
    # a row that is one document throughout, and a row that starts with padding
    cu_seqlens, longest = attention.packed_segments(torch.tensor([[0, 1, 2, 3], [-1, -1, -1, -1]]))
    assert cu_seqlens.tolist() == [0, 4, 8] and int(longest) == 4


def test_collator_gives_boundaries_instead_of_a_mask():
    collate = Collator(pad_id=0, packing=True, padding="longest", max_seq_length=4, attn_implementation="varlen")
    batch = collate([{"input_ids": [1, 2, 3, 4], "position_ids": [0, 1, 2, 0]},
                     {"input_ids": [9, 8, 0, 0], "position_ids": [0, 1, -1, -1]}])
    assert "attention_mask" not in batch
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 6, 8]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]]
    inputs = model_inputs(batch)
    assert set(inputs) == {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                           "max_length_k"}
    assert inputs["max_length_q"] == inputs["max_length_k"] == 3
    padded = Collator(0, False, "longest", 8, "varlen")([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert "attention_mask" not in padded and padded["cu_seqlens"].tolist() == [0, 3, 4, 6]


def reference_attention(query, key, value, cu_seqlens, scale):
    """Per document, K/V expanded to every query head, an explicit lower-triangular mask."""
    groups = query.shape[1] // key.shape[1]
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q = query[start:end].transpose(0, 1)
        k = key[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = value[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        mask = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outputs)


def test_segment_attention_equals_per_document_attention_with_gqa():
    torch.manual_seed(0)
    lengths = [5, 17, 17, 1, 40, 17, 3]  # repeated lengths share one batched call
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    query = torch.randn(total, 4, 16, requires_grad=True)
    key = torch.randn(total, 2, 16, requires_grad=True)
    value = torch.randn(total, 2, 16, requires_grad=True)
    weights = torch.randn(total, 4, 16)
    out = attention.segment_attention(query, key, value, cu_seqlens, max(lengths), 0.25)
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    ref = reference_attention(query, key, value, cu_seqlens, 0.25)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (query, key, value))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape  # K/V gradients at their own head count
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qk_dim, v_dim", [(32, 16), (16, 32), (24, 24)])
def test_a_v_head_dim_other_than_qk_is_padded_and_cropped_exactly(qk_dim, v_dim):
    """MLA lets v's head dim differ from q/k's (DeepSeek-V3: 128 vs 192); the flash kernel takes one. The narrower side
    zero-padded and the output cropped gives what per-document attention at the real dims gives, gradients too (the
    kit's path on CPU as on CUDA; the scale stays the real q/k width's)."""
    torch.manual_seed(1)
    lengths = [5, 17, 17, 40]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    query = torch.randn(total, 4, qk_dim, requires_grad=True)
    key = torch.randn(total, 4, qk_dim, requires_grad=True)
    value = torch.randn(total, 4, v_dim, requires_grad=True)
    seen = []

    def one_head_dim(q, k, v, cu, longest, scale):  # a kernel that, like flash, takes a single head dim
        assert q.shape[-1] == k.shape[-1] == v.shape[-1]
        seen.append(scale)
        return attention._segments_by_length(q, k, v, cu, longest, scale)

    out = attention.with_matched_head_dims(one_head_dim, query, key, value, cu_seqlens, max(lengths), None)
    assert out.shape == (total, 4, v_dim) and seen == [qk_dim ** -0.5 if qk_dim != v_dim else None]
    weights = torch.randn(total, 4, v_dim)
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    ref = reference_attention(query, key, value, cu_seqlens, qk_dim ** -0.5)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (query, key, value))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the kit's own call pads on CPU too (sdpa's lean kernel wants one head dim as well) and gives the same
    torch.testing.assert_close(attention.segment_attention(query, key, value, cu_seqlens, max(lengths), None), ref,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# The tiny model: varlen vs masked sdpa, loss and every LoRA gradient
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_models(tmp_path_factory, tiny_model_dir, demo_corpus):
    """The kit's 4-bit tiny model with LoRA, once per attention implementation, the same random adapter
    weights in both (random lora_B too, so that every LoRA matrix gets a gradient)."""
    return {attn: model_with_random_adapter(tmp_path_factory.mktemp(attn), tiny_model_dir, demo_corpus,
                                            {"model.attn_implementation": attn})[0]
            for attn in ("sdpa", "varlen")}


def random_docs(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 2000, (n,), generator=generator).tolist() for n in lengths]


def packed_rows(lengths):
    packed = pack_rows(random_docs(lengths), ROW, PAD)
    return [{"input_ids": r, "position_ids": p} for r, p in zip(packed["input_ids"], packed["position_ids"])]


CASES = {
    # 5 rows: a 300-token document split over three rows, documents of 1 and 5 tokens, a padded last row
    "packed, several rows, split documents, padded last row": (True, packed_rows([37, 300, 41, 5, 120, 1, 90])),
    "packed, one full row": (True, packed_rows([60, 68])),
    "unpacked, padded to the longest": (False, [{"input_ids": d} for d in random_docs([70, 128, 9], seed=1)]),
}


def loss_and_grads(model, batch, train: bool):
    from glmkit.train.step import loss_sum

    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same LoRA dropout draws on both paths
    loss = loss_sum(model, batch)
    if not train:
        return loss.item(), {}
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_varlen_loss_and_lora_gradients_equal_masked_sdpa(lora_models, case):
    packing, rows = CASES[case]
    results = {}
    for attn, model in lora_models.items():
        batch = Collator(PAD, packing, "longest", ROW, attn)(rows)
        assert ("attention_mask" in batch) == (attn == "sdpa")
        results[attn] = loss_and_grads(model, batch, train=True) + loss_and_grads(model, batch, train=False)[:1]
    (sdpa_loss, sdpa_grads, sdpa_eval), (varlen_loss, varlen_grads, varlen_eval) = results["sdpa"], results["varlen"]
    assert varlen_loss == pytest.approx(sdpa_loss, rel=1e-5)
    assert varlen_eval == pytest.approx(sdpa_eval, rel=1e-5)
    assert sdpa_grads.keys() == varlen_grads.keys() and len(sdpa_grads) > 0
    for name, want in sdpa_grads.items():
        scale = want.abs().max().item()
        assert scale > 0, name
        assert (varlen_grads[name] - want).abs().max().item() <= 1e-5 * scale, name


def test_without_boundaries_a_row_is_one_causal_sequence(lora_models):
    """Generation and plain calls pass no cu_seqlens: varlen then behaves as sdpa without a mask."""
    ids = torch.tensor(random_docs([50, 50]))
    with torch.no_grad():
        lora_models["varlen"].eval()
        lora_models["sdpa"].eval()
        varlen = lora_models["varlen"](input_ids=ids).logits
        sdpa = lora_models["sdpa"](input_ids=ids).logits
    torch.testing.assert_close(varlen, sdpa, rtol=1e-5, atol=1e-5)
