"""Data: packed (or one-document) rows over the token stores, and collation into batches.

Packing puts documents end to end in rows of exactly `max_seq_length` tokens. Each token
carries its position inside its own document; the collator turns those positions into a
block-diagonal causal mask, because with sdpa restarting position_ids alone does not stop
attention from crossing a document boundary. The first token of each document is never
a training target, so nothing is predicted from the previous document.

Rows are not stored token by token: a row is a list of pieces (a start in the token stores
and a length), computed from document lengths alone and memory-mapped at training time.

Chat documents (glmkit/data/chat.py) carry a trained flag per token, stored as bits beside their
tokens: a row reads them with its tokens (`trained`), and the collator gives every untrained
token the label IGNORE_INDEX, so the loss, its token count and every eval count trained tokens
only. A chat document is never split over two rows (it is at most max_seq_length long): one that
does not fit where a row stands waits while the documents after it fill the row (pack_layout).
Where the documents come from and how they are tokenized: glmkit/data/sources.py, glmkit/data/token_store.py;
which documents go where: glmkit/data/prepare.py.
"""

from __future__ import annotations

import bisect
import collections
import os

import numpy as np
import torch

from glmkit.model.attention import model_kwargs as varlen_kwargs
from glmkit.model.attention import packed_segments
from glmkit.data.sources import DataError  # noqa: F401 - the data path's error, raised from here too

IGNORE_INDEX = -100
LAYOUT_BLOCK_DOCS = 1 << 20  # documents laid out at once: bounds the temporaries for huge corpora
PACK_WINDOW = 64  # whole (chat) documents held back at most while later ones fill the row they did not fit


# ---------------------------------------------------------------------------
# Row layout: documents -> rows of pieces
# ---------------------------------------------------------------------------

def pack_layout(starts: np.ndarray, lengths: np.ndarray, max_seq_length: int, packing: bool,
                whole: np.ndarray | None = None):
    """(row_ptr, piece_start, piece_len) for documents at token offsets `starts` with `lengths`, in order.

    With packing, documents go end to end in rows of max_seq_length; a document that spills over a
    row boundary continues in the next row as a fresh segment (positions from 0). Only the last
    row is short (padded when read), unless `whole` marks documents (chat) that must not be split:
    one that does not fit where the row stands is held back while the documents after it fill the
    row, and placed as soon as it fits (at the latest once PACK_WINDOW documents wait: then the row
    is closed with padding). Without packing, each document is one row, truncated.
    """
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    if not packing:
        return (np.arange(len(starts) + 1, dtype=np.int64), starts.copy(),
                np.minimum(lengths, max_seq_length).astype(np.uint32))
    length = max_seq_length
    # Where each document begins in the packed stream: end to end, or (whole documents) in the order and at
    # the offsets _packed_whole gives.
    keep_whole = whole is not None and bool(np.asarray(whole).any())
    if keep_whole:
        order, packed_at = _packed_whole(lengths, np.asarray(whole, dtype=bool), length)
        starts, lengths = starts[order], lengths[order]
        total = int((packed_at + lengths).max()) if len(lengths) else 0
    else:
        total = int(lengths.sum())
    n_rows = -(-total // length)
    per_row = np.zeros(n_rows, dtype=np.int64)
    piece_starts, piece_lens = [], []
    offset = 0  # where the block's first document begins in the packed stream
    for lo in range(0, len(lengths), LAYOUT_BLOCK_DOCS):
        lens, doc_start = lengths[lo:lo + LAYOUT_BLOCK_DOCS], starts[lo:lo + LAYOUT_BLOCK_DOCS]
        keep = lens > 0
        lens, doc_start = lens[keep], doc_start[keep]
        if keep_whole:
            begins = packed_at[lo:lo + LAYOUT_BLOCK_DOCS][keep]
            ends = begins + lens
        else:
            ends = offset + np.cumsum(lens)
            begins = ends - lens
        first_row, last_row = begins // length, (ends - 1) // length
        n_pieces = last_row - first_row + 1
        doc = np.repeat(np.arange(len(lens)), n_pieces)
        within = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        row = first_row[doc] + within
        lo_token = np.maximum(begins[doc], row * length)
        hi_token = np.minimum(ends[doc], (row + 1) * length)
        piece_starts.append(doc_start[doc] + (lo_token - begins[doc]))
        piece_lens.append((hi_token - lo_token).astype(np.uint32))
        np.add.at(per_row, row, 1)
        offset = int(ends[-1]) if len(ends) else offset
    row_ptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    return row_ptr, cat(piece_starts, np.int64), cat(piece_lens, np.uint32)


def _packed_whole(lengths: np.ndarray, whole: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' packing order, each one's offset in the packed stream) when the `whole` ones may not
    cross a row boundary: a whole document that does not fit where the row stands waits (in order) while later
    documents fill the row; when PACK_WINDOW wait, the row is closed with padding. A function of the order
    alone, like the rest of the layout."""
    lens, keep_whole = lengths.tolist(), whole.tolist()
    order, begins = np.empty(len(lens), dtype=np.int64), np.empty(len(lens), dtype=np.int64)
    waiting: list[int] = []
    at = placed = 0
    for i, n in enumerate(lens + [None]):  # None: the end, where every waiting document is placed
        while waiting and lens[waiting[0]] <= length - at % length:  # the oldest fits where the row stands
            order[placed], begins[placed] = waiting[0], at
            placed, at = placed + 1, at + lens[waiting.pop(0)]
        while waiting and (n is None or len(waiting) > PACK_WINDOW):
            # Too many held back (or the end): pad out the row and fill the next one from the waiting documents,
            # oldest first, each that still fits; the rest wait again (at the end: for the row after).
            at += (length - at % length) % length
            room, kept = length, []
            for j in waiting:
                if lens[j] <= room:
                    order[placed], begins[placed] = j, at
                    placed, at, room = placed + 1, at + lens[j], room - lens[j]
                else:
                    kept.append(j)
            waiting = kept
            if n is not None:
                break
        if n is None:
            break
        if keep_whole[i] and length - at % length < n <= length:
            waiting.append(i)
            continue
        order[placed], begins[placed] = i, at
        placed, at = placed + 1, at + n
    return order, begins


def pack_rows(docs: list[list[int]], max_seq_length: int, pad_id: int,
              trained: list[list[bool]] | None = None) -> dict[str, list[list]]:
    """Packed rows of in-memory documents (the same layout the training rows use); with `trained` flags per
    token, chat documents: kept whole, and their flags read back as each row's `trained`."""
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.array([t for d in docs for t in d], dtype=np.uint32)
    whole = None if trained is None else np.ones(len(docs), dtype=bool)
    layout = pack_layout(np.cumsum(lengths) - lengths, lengths, max_seq_length, packing=True, whole=whole)
    bits = None if trained is None else [np.packbits(np.array([f for t in trained for f in t], dtype=bool),
                                                     bitorder="little")]
    rows = Rows([tokens], layout, max_seq_length, pad_id, packing=True, trained_bits=bits)
    read = [rows[i] for i in range(len(rows))]
    out = {"input_ids": [r["input_ids"] for r in read], "position_ids": [r["position_ids"] for r in read]}
    if trained is not None:
        out["trained"] = [r["trained"] for r in read]
    return out


class Rows(torch.utils.data.Dataset):
    """Training or validation rows, read from memory-mapped token stores on indexing.

    Each row gives per-token `input_ids` and `position_ids` (restarting at 0 for each document
    segment, -1 for padding); without packing, just the document's `input_ids`. When any store
    holds chat documents (`trained_bits`: per store its packed bits, None for a text store, all
    trained), every row also gives `trained`, a bool per token (False for padding).
    """

    def __init__(self, token_arrays: list[np.ndarray], layout, max_seq_length: int, pad_id: int, packing: bool,
                 trained_bits: list[np.ndarray | None] | None = None):
        self.token_arrays = token_arrays
        self.trained_bits = trained_bits if trained_bits and any(b is not None for b in trained_bits) else None
        self.bases = [0]
        for tokens in token_arrays:
            self.bases.append(self.bases[-1] + len(tokens))
        self.row_ptr, self.piece_start, self.piece_len = layout
        self.max_seq_length, self.pad_id, self.packing = max_seq_length, pad_id, packing

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def tokens(self) -> int:
        """Real (non-pad) tokens over all rows."""
        return int(self.piece_len.sum(dtype=np.int64))

    def pieces(self, index: int) -> list[tuple[int, int, int]]:
        """The row's pieces as (store index, start within that store, length), in order."""
        lo, hi = int(self.row_ptr[index]), int(self.row_ptr[index + 1])
        out = []
        for start, n in zip(self.piece_start[lo:hi].tolist(), self.piece_len[lo:hi].tolist(), strict=True):
            which = bisect.bisect_right(self.bases, start) - 1
            out.append((which, start - self.bases[which], n))
        return out

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        ids, positions, trained = [], [], []
        for which, local, n in self.pieces(index):
            ids.append(self.token_arrays[which][local:local + n])
            positions.append(np.arange(n))
            if self.trained_bits is not None:
                trained.append(read_bits(self.trained_bits[which], local, n))
        row = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
        flags = (np.concatenate(trained) if trained else np.zeros(0, bool)).tolist()
        if not self.packing:
            return {"input_ids": row.tolist(), **({"trained": flags} if self.trained_bits is not None else {})}
        pos = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        pad = self.max_seq_length - len(row)
        out = {"input_ids": row.tolist() + [self.pad_id] * pad, "position_ids": pos.tolist() + [-1] * pad}
        if self.trained_bits is not None:
            out["trained"] = flags + [False] * pad
        return out


def read_bits(bits: np.ndarray | None, start: int, n: int) -> np.ndarray:
    """Flags start..start+n-1 of a store's packed trained bits (None: a text store, every token trained)."""
    if bits is None:
        return np.ones(n, dtype=bool)
    first, last = start // 8, (start + n + 7) // 8
    return np.unpackbits(np.asarray(bits[first:last]), bitorder="little")[start % 8:start % 8 + n].astype(bool)


def save_layout(folder: str, name: str, layout) -> None:
    for part, array in zip(("row_ptr", "piece_start", "piece_len"), layout, strict=True):
        np.save(os.path.join(folder, f"{name}.{part}.npy"), array)


def load_layout(folder: str, name: str):
    return tuple(np.load(os.path.join(folder, f"{name}.{part}.npy"), mmap_mode="r")
                 for part in ("row_ptr", "piece_start", "piece_len"))


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
    def __init__(self, pad_id: int, packing: bool, padding: str, max_seq_length: int, attn_implementation: str,
                 pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.packing = packing
        self.padding = padding
        self.max_seq_length = max_seq_length
        self.attn_implementation = attn_implementation
        # distributed.sequence_parallel: rows are cut into that many equal slices (packed rows are
        # max_seq_length long, which validation makes a multiple of it)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self._packed(rows) if self.packing else self._padded(rows)

    def _packed(self, rows):
        input_ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        positions = torch.tensor([r["position_ids"] for r in rows], dtype=torch.long)
        real = positions >= 0
        labels = input_ids.masked_fill(~real | (positions == 0) | ~_trained(rows, real), IGNORE_INDEX)
        batch = {"input_ids": input_ids, "position_ids": positions.clamp(min=0), "labels": labels,
                 "token_mask": real}
        if self.attn_implementation == "varlen":
            # Segment boundaries instead of a mask (glmkit/model/attention.py).
            batch["cu_seqlens"], batch["max_seqlen"] = packed_segments(positions)
        elif self.attn_implementation != "flash_attention_2":
            # flash-attention varlen finds boundaries from position_ids; sdpa/eager need the mask.
            batch["attention_mask"] = block_causal_mask(positions)
        return batch

    def _padded(self, rows):
        length = self.max_seq_length if self.padding == "max_length" else max(len(r["input_ids"]) for r in rows)
        length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        real = torch.zeros((len(rows), length), dtype=torch.bool)
        trained = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            real[i, : len(row["input_ids"])] = True
            if "trained" in row:
                trained[i, : len(row["trained"])] = torch.tensor(row["trained"], dtype=torch.bool)
        if "trained" not in rows[0]:
            trained = real
        labels = input_ids.masked_fill(~real | ~trained, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "labels": labels, "token_mask": real}
        if self.attn_implementation == "varlen":
            # Each row is one document and one run of padding: two segments, no mask.
            positions = torch.arange(length).expand(len(rows), length).masked_fill(~real, -1)
            batch["cu_seqlens"], batch["max_seqlen"] = packed_segments(positions)
        else:
            batch["attention_mask"] = real.long()
        return batch


def _trained(rows: list[dict], real: torch.Tensor) -> torch.Tensor:
    """The rows' trained flags (chat data), or every real token (text)."""
    if "trained" not in rows[0]:
        return real
    return torch.tensor([r["trained"] for r in rows], dtype=torch.bool)


def make_collator(tokenizer, cfg) -> Collator:
    t = cfg.training
    return Collator(tokenizer.pad_token_id, t.packing, t.padding, t.max_seq_length, cfg.model.attn_implementation,
                    pad_to_multiple_of=cfg.distributed.sequence_parallel)


def model_inputs(batch: dict) -> dict:
    """The batch minus bookkeeping the model does not take; segment boundaries as the model's kwargs (and a
    slice of rows' `sequence_group` passed on to the attention, glmkit/train/sequence_parallel.py)."""
    bookkeeping = ("token_mask", "labels", "targets", "cu_seqlens", "max_seqlen")
    inputs = {k: v for k, v in batch.items() if k not in bookkeeping}
    if "cu_seqlens" in batch:
        inputs.update(varlen_kwargs(batch["cu_seqlens"], batch["max_seqlen"]))
    return inputs
