"""A document longer than token_store.LONG_DOCUMENT_CHARS is tokenized in pieces: the same ids as in one
piece on ordinary text, one document with one EOS and the digest of its whole text, and a preparation whose
input is one huge line stays in bounded memory (the Rust tokenizer took ~130 bytes a character of one string)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, jsonl_bytes, write_tiny_config

from glmkit.data import token_store

EOS = 99_999  # outside the tiny vocabulary, so counting it counts documents


@pytest.fixture
def tiny_worker(monkeypatch, tiny_model_dir):
    """The worker state _init_worker sets up, in this process (without its parent-death signal)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(os.path.join(tiny_model_dir, "tokenizer.json"))

    def encode(texts):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    monkeypatch.setattr(token_store, "_worker", {"encode": encode, "eos": EOS, "text_field": "text"})
    return encode


def tokenized(texts: list[str]):
    return token_store.tokenize_chunk(1, [line for line in jsonl_bytes(texts).splitlines(keepends=True)], False)


def ordinary_texts(demo_corpus) -> list[str]:
    with open(demo_corpus, encoding="utf-8") as fh:
        prose = [json.loads(line)["text"] for line in fh]
    joined = "\n\n".join(prose[:40])  # prose: single spaces, newlines, blank lines, punctuation, digits
    return [joined,
            joined.replace(" ", "\n"),  # no space: pieces end before newlines (same ids under the tiny GPT-2 regex)
            joined.replace(". ", ".  ").replace(",", ",\t"),  # runs of spaces, tabs
            joined.replace("\n", " \n")]                  # a space before each newline


def test_long_documents_in_pieces_give_the_ids_of_one_piece(monkeypatch, tiny_worker, demo_corpus):
    texts = ordinary_texts(demo_corpus)
    whole = tokenized(texts)
    monkeypatch.setattr(token_store, "LONG_DOCUMENT_CHARS", 500)
    assert min(len(text) for text in texts) > 20 * 500
    pieces = tokenized(texts)
    np.testing.assert_array_equal(pieces[0], whole[0])
    np.testing.assert_array_equal(pieces[1], whole[1])
    assert pieces[2] == whole[2] == b"".join(hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts)
    assert pieces[3] == whole[3] == []
    assert (pieces[0] == EOS).sum() == len(texts)


def test_pieces_cover_the_text_and_end_before_a_space_followed_by_a_word(monkeypatch, demo_corpus):
    monkeypatch.setattr(token_store, "LONG_DOCUMENT_CHARS", 300)
    with_spaces, newlines_only, _, _ = ordinary_texts(demo_corpus)
    for text, boundary in ((with_spaces, " "), (newlines_only, "\n")):
        pieces = list(token_store._pieces(text))
        assert "".join(pieces) == text and all(0 < len(piece) <= 300 for piece in pieces)
        assert all(p[0] == boundary and not p[1].isspace() for p in pieces[1:])
    # No whitespace in a window: cut at the limit; a newline before a word further on is still preferred.
    assert [len(p) for p in token_store._pieces("x" * 1000)] == [300, 300, 300, 100]
    assert [len(p) for p in token_store._pieces("y" * 650 + "\n" + "z" * 650)] == [300, 300, 50, 300, 300, 51]


def test_a_huge_line_is_prepared_in_bounded_memory(tmp_path, tiny_model_dir):
    """A 16 MiB document: the preparer and its worker each stay under 1.2 GB of peak RSS (before the pieces,
    the worker reached about 2.5 GB at this size, 4.7 GB at 30 MiB; after, 0.5 GB). ru_maxrss of RUSAGE_CHILDREN, read in a wrapper process that runs only
    the preparer, is the peak of the largest of the preparer and its (waited-for) workers."""
    sentence = "The quick brown fox, 1234 times, jumps over the lazy dog.\n"
    long_text = sentence * (16 * 2**20 // len(sentence))
    (tmp_path / "long.jsonl").write_bytes(jsonl_bytes(["A short document.", long_text, "Another one."]))
    config = write_tiny_config(tmp_path, tiny_model_dir, str(tmp_path / "long.jsonl"),
                               {"performance.tokenizer_workers": 1, "training.val_fraction": 0})
    wrapper = ("import resource, subprocess, sys\n"
               "done = subprocess.run([sys.executable, 'train_qlora.py', '--config', sys.argv[1], '--prepare-data'])\n"
               "print('peak_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(done.returncode)\n")
    result = subprocess.run([sys.executable, "-c", wrapper, config], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stdout + result.stderr
    peak_gb = int(result.stdout.split("peak_kib")[-1]) / 2**20
    store = next((tmp_path / "scratch" / "tokenized" / "files").iterdir())
    assert json.loads((store / "meta.json").read_text())["docs"] == 3
    print(f"peak RSS of the preparer or its worker: {peak_gb:.2f} GB")
    assert peak_gb < 1.2
