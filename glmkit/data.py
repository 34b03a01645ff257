"""Data: JSONL documents -> validated, split, tokenized, packed (or padded) batches.

Packing puts documents end to end in rows of exactly `max_seq_length` tokens. Each token
carries its position inside its own document; the collator turns those positions into a
block-diagonal causal mask, because with sdpa restarting position_ids alone does not stop
attention from crossing a document boundary. The first token of each document is never
a training target, so nothing is predicted from the previous document.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass

import torch

from glmkit.attention import model_kwargs as varlen_kwargs
from glmkit.attention import packed_segments

IGNORE_INDEX = -100
PACK_BATCH_DOCS = 2_000  # documents packed together; each such batch pads at most one row


class DataError(ValueError):
    """The corpus can't be used; the message names the file, the line and the fix."""


@dataclass
class Corpus:
    train_docs: list[str]
    val_docs: list[str]
    bad_lines: list[str]
    fingerprint: str


def read_documents(path: str, text_field: str, skip_bad_lines: bool) -> tuple[list[str], list[str]]:
    """Every document of a JSONL file, and the bad lines as 'file:line: reason'."""
    if not os.path.isfile(path):
        what = "not a regular file" if os.path.exists(path) else "no such file"
        raise DataError(f"{path}: {what}; set paths.data_path to a JSONL file "
                        f"(python -m glmkit.demo_data writes a demo corpus)")
    docs, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            reason = None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                reason = f"invalid JSON ({exc.msg})"
            else:
                if not isinstance(record, dict) or text_field not in record:
                    reason = f"missing field {text_field!r}"
                elif not isinstance(record[text_field], str):
                    reason = f"field {text_field!r} is not a string"
                elif not record[text_field].strip():
                    reason = f"field {text_field!r} is empty"
            if reason is None:
                docs.append(record[text_field])
            else:
                bad.append(f"{path}:{number}: {reason}")
    if bad and not skip_bad_lines:
        shown = "\n".join(bad[:20]) + (f"\n... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} bad line(s) in {path}; fix them or set training.skip_bad_lines: true\n{shown}")
    return docs, bad


def load_corpus(cfg) -> Corpus:
    """Read and split deterministically from training.seed and training.val_fraction."""
    t = cfg.training
    docs, bad = read_documents(cfg.paths.data_path, t.text_field, t.skip_bad_lines)
    if not docs:
        raise DataError(f"{cfg.paths.data_path}: no usable documents; each line needs a non-empty {t.text_field!r}")
    order = list(range(len(docs)))
    random.Random(t.seed).shuffle(order)
    n_val = math.ceil(len(docs) * t.val_fraction) if t.val_fraction > 0 else 0
    if t.val_fraction > 0 and len(docs) - n_val < 1:
        raise DataError(f"{cfg.paths.data_path}: {len(docs)} document(s) is too few for a validation split of "
                        f"{t.val_fraction}; add documents or lower training.val_fraction")
    val = [docs[i] for i in order[:n_val]]
    train = [docs[i] for i in order[n_val:]]
    stat = os.stat(cfg.paths.data_path)
    key = f"{os.path.abspath(cfg.paths.data_path)}|{stat.st_size}|{stat.st_mtime_ns}|{t.text_field}|{t.seed}|{t.val_fraction}"
    return Corpus(train, val, bad, hashlib.sha256(key.encode()).hexdigest()[:16])


# ---------------------------------------------------------------------------
# Tokenization and packing (datasets.map, cached on disk under scratch_dir)
# ---------------------------------------------------------------------------

def _tokenize_fn(tokenizer, max_seq_length: int, packing: bool):
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        ids = [row + [eos] for row in ids]
        if not packing:
            return {"input_ids": [row[:max_seq_length] for row in ids]}
        return pack_rows(ids, max_seq_length, tokenizer.pad_token_id)

    return tokenize


def pack_rows(docs: list[list[int]], max_seq_length: int, pad_id: int) -> dict[str, list[list[int]]]:
    """Documents end to end in rows of exactly max_seq_length; positions restart per document.

    A document that spills over a row boundary continues in the next row as a fresh
    segment (positions from 0). Only the last row is padded; pad positions are -1.
    """
    rows, positions = [], []
    row, pos = [], []
    for doc in docs:
        start = 0
        while start < len(doc):
            take = min(len(doc) - start, max_seq_length - len(row))
            row.extend(doc[start:start + take])
            pos.extend(range(take))
            start += take
            if len(row) == max_seq_length:
                rows.append(row)
                positions.append(pos)
                row, pos = [], []
    if row:
        pad = max_seq_length - len(row)
        rows.append(row + [pad_id] * pad)
        positions.append(pos + [-1] * pad)
    return {"input_ids": rows, "position_ids": positions}


def tokenize_split(docs: list[str], tokenizer, cfg, cache_dir: str, name: str):
    """A datasets.Dataset of rows, cached by a key of everything that shapes the rows."""
    import datasets

    t = cfg.training
    key = json.dumps([name, tokenizer.name_or_path, len(tokenizer), t.max_seq_length, t.packing,
                      hashlib.sha256("\x00".join(docs).encode()).hexdigest()])
    cache_file = os.path.join(cache_dir, f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.arrow")
    os.makedirs(cache_dir, exist_ok=True)
    raw = datasets.Dataset.from_dict({"text": docs})
    return raw.map(_tokenize_fn(tokenizer, t.max_seq_length, t.packing), batched=True,
                   batch_size=PACK_BATCH_DOCS, remove_columns=["text"], cache_file_name=cache_file,
                   load_from_cache_file=True, desc=f"tokenizing {name}")


# ---------------------------------------------------------------------------
# Collation: tensors, labels, and the mask (varlen: the segment boundaries)
# that keeps packed documents apart
# ---------------------------------------------------------------------------

def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool, True where query i may attend key j: same document and j <= i."""
    starts = (position_ids == 0) | (position_ids < 0)
    doc_ids = torch.cumsum(starts.long(), dim=1)
    doc_ids = torch.where(position_ids < 0, -1, doc_ids)  # padding attends to nothing real
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    mask = same_doc & causal
    # A padded query row must still attend somewhere or softmax yields NaN; let it see itself.
    mask |= torch.eye(length, dtype=torch.bool, device=position_ids.device)
    return mask[:, None, :, :]


class Collator:
    def __init__(self, pad_id: int, packing: bool, padding: str, max_seq_length: int, attn_implementation: str):
        self.pad_id = pad_id
        self.packing = packing
        self.padding = padding
        self.max_seq_length = max_seq_length
        self.attn_implementation = attn_implementation

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self._packed(rows) if self.packing else self._padded(rows)

    def _packed(self, rows):
        input_ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        positions = torch.tensor([r["position_ids"] for r in rows], dtype=torch.long)
        real = positions >= 0
        labels = input_ids.masked_fill(~real | (positions == 0), IGNORE_INDEX)
        batch = {"input_ids": input_ids, "position_ids": positions.clamp(min=0), "labels": labels,
                 "token_mask": real}
        if self.attn_implementation == "varlen":
            # Segment boundaries instead of a mask (glmkit/attention.py).
            batch["cu_seqlens"], batch["max_seqlen"] = packed_segments(positions)
        elif self.attn_implementation != "flash_attention_2":
            # flash-attention varlen finds boundaries from position_ids; sdpa/eager need the mask.
            batch["attention_mask"] = block_causal_mask(positions)
        return batch

    def _padded(self, rows):
        length = self.max_seq_length if self.padding == "max_length" else max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        real = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            real[i, : len(row["input_ids"])] = True
        labels = input_ids.masked_fill(~real, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "labels": labels, "token_mask": real}
        if self.attn_implementation == "varlen":
            # Each row is one document and one run of padding: two segments, no mask.
            positions = torch.arange(length).expand(len(rows), length).masked_fill(~real, -1)
            batch["cu_seqlens"], batch["max_seqlen"] = packed_segments(positions)
        else:
            batch["attention_mask"] = real.long()
        return batch


def make_collator(tokenizer, cfg) -> Collator:
    t = cfg.training
    return Collator(tokenizer.pad_token_id, t.packing, t.padding, t.max_seq_length, cfg.model.attn_implementation)


def model_inputs(batch: dict) -> dict:
    """The batch minus bookkeeping the model does not take; segment boundaries as the model's kwargs."""
    inputs = {k: v for k, v in batch.items() if k not in ("token_mask", "labels", "cu_seqlens", "max_seqlen")}
    if "cu_seqlens" in batch:
        inputs.update(varlen_kwargs(batch["cu_seqlens"], batch["max_seqlen"]))
    return inputs
