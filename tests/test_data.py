"""Data: bad lines by line number, the content-hash split, packing that isolates documents."""

import json

import pytest
import torch
from conftest import write_demo_corpus_in_fresh_process

from glmkit.config.load import load_config
from glmkit.data.prepare import load_tokenizer, prepare_data
from glmkit.data.rows import IGNORE_INDEX, Collator, DataError, block_causal_mask, pack_rows  # noqa: F401
from glmkit.data.sources import parse_line, utf8


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def prepared(config_path):
    cfg = load_config(config_path)
    return prepare_data(cfg, load_tokenizer(cfg), show_progress=False)


def test_each_kind_of_bad_line_has_its_reason():
    assert parse_line(json.dumps({"text": "fine"}).encode(), "text") == ("fine", None)
    assert parse_line(b"   \n", "text") == (None, None)  # blank lines are not documents, nor bad
    assert parse_line(b"{not json", "text")[1].startswith("invalid JSON")
    assert parse_line(json.dumps({"body": "x"}).encode(), "text")[1] == "missing field 'text'"
    assert parse_line(json.dumps({"text": 3}).encode(), "text")[1] == "field 'text' is not a string"
    assert parse_line(json.dumps({"text": "  "}).encode(), "text")[1] == "field 'text' is empty"
    text, _ = parse_line(b'{"text": "abc \\ud800"}', "text")
    assert utf8(text, "text")[1].startswith("field 'text' holds an unpaired surrogate")


def test_bad_lines_are_reported_by_file_and_line(tmp_path, make_config):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "fine " * 30})] * 30 + [
        "{not json", json.dumps({"body": "x"}), json.dumps({"text": 3}), json.dumps({"text": "   "}),
        json.dumps({"text": "also fine " * 30})])
    with pytest.raises(DataError) as info:
        prepared(make_config({"paths.data_path": path, "training.val_fraction": 0.0}))
    message = str(info.value)
    assert message.startswith(f"4 bad line(s) in 1 file(s) ({path}: 4); fix them or set training.skip_bad_lines: true")
    for line, reason in [(31, "invalid JSON"), (32, "missing field 'text'"), (33, "field 'text' is not a string"),
                         (34, "field 'text' is empty")]:
        assert f"{path}:{line}: {reason}" in message
    data = prepared(make_config({"paths.data_path": path, "training.val_fraction": 0.0,
                                 "training.skip_bad_lines": True}, name="skip.yaml"))
    assert data.bad_line_count == 4 and data.summary["train"]["docs"] == 31


def test_empty_and_too_small_corpora(tmp_path, make_config):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no training documents"):
        prepared(make_config({"paths.data_path": empty}))
    one = write_lines(tmp_path / "one.jsonl", [json.dumps({"text": "only one"})])
    with pytest.raises(DataError, match="no training documents|no document fell into the validation split"):
        prepared(make_config({"paths.data_path": one, "training.val_fraction": 0.5}, name="one.yaml"))


def test_split_is_deterministic_disjoint_and_seeded(make_config):
    settings = {"training.packing": False, "training.max_seq_length": 8192}
    a, b = prepared(make_config(settings)), prepared(make_config(settings, name="again.yaml"))
    rows = lambda r: [tuple(r[i]["input_ids"]) for i in range(len(r))]  # noqa: E731
    assert rows(a.train_rows) == rows(b.train_rows) and rows(a.val_rows) == rows(b.val_rows)
    assert not set(rows(a.train_rows)) & set(rows(a.val_rows))
    assert 10 <= len(a.val_rows) <= 32 and len(a.train_rows) + len(a.val_rows) == 400  # about 5% of 400, by hash
    other_seed = prepared(make_config({**settings, "training.seed": 7}, name="c2.yaml"))
    assert set(rows(other_seed.val_rows)) != set(rows(a.val_rows))


def test_pack_rows_fills_rows_and_restarts_positions():
    packed = pack_rows([[1, 2, 3], [4, 5, 6, 7, 8], [9]], max_seq_length=4, pad_id=0)
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert packed["position_ids"] == [[0, 1, 2, 0], [0, 1, 2, 3], [0, -1, -1, -1]]


def test_block_mask_and_labels_keep_documents_apart():
    collate = Collator(pad_id=0, packing=True, padding="longest", max_seq_length=4, attn_implementation="sdpa")
    batch = collate([{"input_ids": [1, 2, 3, 4], "position_ids": [0, 1, 2, 0]},
                     {"input_ids": [9, 8, 0, 0], "position_ids": [0, 1, -1, -1]}])
    mask = batch["attention_mask"][0, 0]
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, True, True, False], [False, False, False, True]]
    # the first token of a document is never predicted from the previous one; pads never count
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["token_mask"].sum().item() == 6


def test_padding_modes_never_count_pads():
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]
    longest = Collator(0, False, "longest", 8, "sdpa")(rows)
    assert longest["input_ids"].shape == (2, 3)
    assert longest["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    full = Collator(0, False, "max_length", 8, "sdpa")(rows)
    assert full["input_ids"].shape == (2, 8) and int(full["token_mask"].sum()) == 4


def test_packed_row_loss_equals_per_document_losses(tiny_model_dir, make_config):
    """With the block mask, one packed row scores exactly like its documents run one at a time."""
    from transformers import AutoModelForCausalLM

    from glmkit.train.step import loss_sum, target_tokens

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    docs = [torch.randint(2, 2048, (n,)).tolist() for n in (37, 50, 41)]
    packed = pack_rows(docs, max_seq_length=128, pad_id=1)
    collate = Collator(1, True, "longest", 128, "sdpa")
    with torch.no_grad():
        batch = collate([{"input_ids": r, "position_ids": p} for r, p in zip(packed["input_ids"], packed["position_ids"])])
        packed_sum, packed_tokens = loss_sum(model, batch).item(), target_tokens(batch)
        singles = [Collator(1, False, "longest", 128, "sdpa")([{"input_ids": d}]) for d in docs]
        single_sum = sum(loss_sum(model, b).item() for b in singles)
        single_tokens = sum(target_tokens(b) for b in singles)
        # with a plain causal mask, attention leaks across documents and the loss changes
        leaky = {k: v for k, v in batch.items() if k not in ("attention_mask", "position_ids")}
        leaky_sum = loss_sum(model, leaky).item()
    assert packed_tokens == single_tokens == sum(len(d) - 1 for d in docs)
    assert abs(packed_sum / packed_tokens - single_sum / single_tokens) <= 1e-5
    assert abs(leaky_sum / packed_tokens - single_sum / single_tokens) > 1e-4


def test_demo_corpus_is_the_frozen_one_in_every_process_and_checkout(tmp_path, demo_corpus):
    """The corpus is read from the repository, not rendered by this interpreter (whose pydoc pages change with
    its build and with what the process imported: transformers adds methods to logging.Logger); it carries no
    memory address or path of this checkout, and the tiny tokenizer is trained on exactly its text."""
    import sys

    from conftest import ROOT

    from glmkit.demo.corpus import iter_documents

    again = str(tmp_path / "again.jsonl")
    write_demo_corpus_in_fresh_process(again, max_docs=None, env={"PYTHONHASHSEED": "12345"})
    full = open(again, encoding="utf-8").read()
    assert full.splitlines()[:400] == open(demo_corpus, encoding="utf-8").read().splitlines()
    assert [json.loads(line)["text"] for line in full.splitlines()] == list(iter_documents())
    assert len(full.splitlines()) == 1169
    for leak in (" at 0x", sys.executable, ROOT, "info_once"):
        assert leak not in full, leak


def test_make_demo_data_again_leaves_the_corpus_and_its_token_store_alone(tmp_path):
    """`make demo` writes the demo corpus every time; a rewrite of the same bytes gave the file a new mtime, so the
    next run said it removed the token store and tokenized the corpus again. Now the same bytes stay as they are."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    config = tmp_path / "demo.yaml"
    config.write_text(f"paths:\n  data_path: {tmp_path / 'demo.jsonl'}\n")

    def write() -> str:
        result = subprocess.run([sys.executable, "-m", "glmkit.demo.corpus", "--config", str(config), "--max-docs",
                                 "50"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.strip()

    assert write() == f"wrote 50 documents to {tmp_path / 'demo.jsonl'}"
    before = os.stat(tmp_path / "demo.jsonl").st_mtime_ns
    assert write() == f"{tmp_path / 'demo.jsonl'} already holds the 50 demo documents"
    assert os.stat(tmp_path / "demo.jsonl").st_mtime_ns == before and not os.path.exists(tmp_path / "demo.jsonl.tmp")
