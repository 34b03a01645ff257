"""See what is trained: the first prepared training rows, token by token, with the trained ones marked.

    python train_qlora.py --config C --inspect-data 3          # readable, trained tokens between ⟦ and ⟧
    python train_qlora.py --config C --inspect-data 3 --json   # one JSON object per row

The rows are the prepared training rows in their laid-out order (the data loader shuffles them per
epoch), text and chat alike, and "trained" is read off the labels the collator builds for the loss
(glmkit/data/rows.py), so it is exactly what the loss counts: a chat row's trained tokens
(glmkit/data/chat.py), every text token but a document's first. No model weights are loaded.

A JSON row is `{"row": i, "source": ..., "segments": [{"source", "tokens", "trained"}], "tokens":
[[token_text, trained], ...]}`: `source` is the configured source of the row's first token, `segments`
its documents (or pieces of documents) in order, and `tokens` every real token (no padding).
"""

from __future__ import annotations

import json
import sys

from glmkit.data.rows import IGNORE_INDEX
from glmkit.data.sources import DataError

OPEN, CLOSE = "⟦", "⟧"


def inspect_rows(prepared, tokenizer, collator, count: int) -> list[dict]:
    """The first `count` training rows as {row, source, segments, tokens}."""
    rows, files, sources = prepared.train_rows, prepared.summary["files"], prepared.summary["sources"]
    out = []
    for index in range(min(count, len(rows))):
        row = rows[index]
        labels = collator([row])["labels"][0].tolist()
        pieces = rows.pieces(index)
        real = sum(n for _, _, n in pieces)
        ids = row["input_ids"][:real]
        texts = [tokenizer.decode([token], skip_special_tokens=False) for token in ids]
        trained = [label != IGNORE_INDEX for label in labels[:real]]
        segments, at = [], 0
        for store, _, n in pieces:
            segments.append({"source": sources[files[store]["source"]]["path"], "tokens": n,
                             "trained": sum(trained[at:at + n])})
            at += n
        out.append({"row": index, "source": segments[0]["source"] if segments else None, "segments": segments,
                    "tokens": [[text, flag] for text, flag in zip(texts, trained, strict=True)]})
    return out


def format_row(row: dict) -> str:
    """A row as text: a header per document, its tokens with the trained runs between ⟦ and ⟧."""
    total = len(row["tokens"])
    lines = [f"row {row['row']}: {total} tokens, {sum(t for _, t in row['tokens'])} trained"]
    at = 0
    for number, segment in enumerate(row["segments"], 1):
        lines.append(f"-- document {number} of the row ({segment['source']}): {segment['tokens']} tokens, "
                     f"{segment['trained']} trained")
        text, inside = [], False
        for token, trained in row["tokens"][at:at + segment["tokens"]]:
            if trained != inside:
                text.append(OPEN if trained else CLOSE)
                inside = trained
            text.append(token)
        if inside:
            text.append(CLOSE)
        lines.append("".join(text))
        at += segment["tokens"]
    return "\n".join(lines)


def run_inspect_cli(cfg, count: int, as_json: bool) -> int:
    """--inspect-data N: prepare (or map) the data, print its first N training rows, exit."""
    from glmkit.data.prepare import load_tokenizer, prepare_data
    from glmkit.data.rows import make_collator
    from glmkit.run.writes import WriteFailed

    if count < 1:
        print("error: --inspect-data N needs N >= 1 (the number of rows to print)", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(cfg)
        prepared = prepare_data(cfg, tokenizer, show_progress=False)
    except (DataError, WriteFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = inspect_rows(prepared, tokenizer, make_collator(tokenizer, cfg), count)
    if as_json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        print(f"the first {len(rows)} of {len(prepared.train_rows):,} training rows; trained tokens between "
              f"{OPEN} and {CLOSE}")
        for row in rows:
            print(format_row(row))
    return 0
