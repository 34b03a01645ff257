"""glmkit.hub.shards: what a safetensors header alone proves; and the trainer turning a damaged shard into one line."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from conftest import ROOT, run_cli, write_tiny_config
from safetensors.torch import save_file

from glmkit.hub import shards

INDEX = "model.safetensors.index.json"


def write_raw(path, header: dict, data: bytes) -> None:
    """A safetensors file with exactly this header and data (no checks, so it can be wrong on purpose)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(4, 2), "b": torch.ones(3, dtype=torch.bfloat16)}, str(path))
    return path


def test_a_file_written_by_safetensors_passes(good):
    assert shards.check_file(str(good), ["a", "b"]) is None


def test_each_tensor_range_must_match_its_dtype_and_shape(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, {"a": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 16]}}, bytes(16))
    assert "needs 32 bytes but its data_offsets span 16" in shards.check_file(str(path))
    write_raw(path, {"a": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))
    assert "unknown dtype 'Q9'" in shards.check_file(str(path))
    write_raw(path, {"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16))
    assert "no valid shape" in shards.check_file(str(path))
    write_raw(path, {"a": {"dtype": "F4", "shape": [8], "data_offsets": [0, 4]}}, bytes(4))
    assert shards.check_file(str(path)) is None  # packed 4-bit: two elements per byte


def test_ranges_must_tile_the_data_without_gaps_or_overlaps(tmp_path):
    path = tmp_path / "x.safetensors"
    a = {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}
    write_raw(path, {"a": a, "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}, bytes(12))
    assert "overlaps" in shards.check_file(str(path))
    write_raw(path, {"a": a, "b": {"dtype": "U8", "shape": [4], "data_offsets": [10, 14]}}, bytes(14))
    assert "gap of 2 bytes" in shards.check_file(str(path))


def test_truncation_extra_bytes_and_garbage_are_caught(good, tmp_path):
    data = good.read_bytes()
    path = tmp_path / "x.safetensors"
    path.write_bytes(data[:-1])
    assert shards.check_file(str(path)).startswith("truncated")
    path.write_bytes(data + b"\0")
    assert "accounts for only" in shards.check_file(str(path))
    path.write_bytes(struct.pack("<Q", 6) + b"[1, 2]" + bytes(40))
    assert "not a JSON object" in shards.check_file(str(path))
    path.write_bytes(bytes(len(data)))  # zeros: header length 0
    assert "not a JSON object" in shards.check_file(str(path))
    path.write_bytes(os.urandom(len(data)))
    assert shards.check_file(str(path)) is not None


def test_expected_tensors_must_be_in_the_file(good):
    assert "lacks 1 tensor(s)" in shards.check_file(str(good), ["a", "c"])


def test_hashes_match_hashlib_and_git(good):
    import hashlib

    data = good.read_bytes()
    assert shards.file_sha256(str(good)) == hashlib.sha256(data).hexdigest()
    assert shards.git_blob_sha1(str(good)) == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---------------------------------------------------------------------------
# The trainer: a damaged shard is one line naming it, exit 2, before anything heavy is loaded
# ---------------------------------------------------------------------------

def damaged_copy(tiny_model_dir, folder, damage: str) -> tuple[str, str]:
    """A copy of the tiny model with one shard damaged; returns (model dir, the damaged file's path)."""
    model_dir = folder / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    with open(model_dir / INDEX, encoding="utf-8") as fh:
        index = json.load(fh)
    shard = sorted(set(index["weight_map"].values()))[1]
    path = model_dir / shard
    size = path.stat().st_size
    if damage == "random-bytes":
        path.write_bytes(os.urandom(size))
    elif damage == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(size - 100)
    elif damage == "missing-tensor":
        index["weight_map"]["model.layers.0.self_attn.extra.weight"] = shard
        (model_dir / INDEX).write_text(json.dumps(index))
    return str(model_dir), str(path)


@pytest.mark.trains
@pytest.mark.parametrize("damage", ["random-bytes", "truncated", "missing-tensor"])
def test_trainer_names_a_damaged_shard_in_one_line(tmp_path, tiny_model_dir, demo_corpus, damage):
    model_dir, shard = damaged_copy(tiny_model_dir, tmp_path, damage)
    config = write_tiny_config(tmp_path, model_dir, demo_corpus, {"training.max_steps": 2})

    result = run_cli([os.path.join(ROOT, "train_qlora.py"), "--config", config], timeout=300)

    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert shard in errors[0] and f"python download_model.py --verify-only --config {config}" in errors[0]
    assert not os.path.exists(tmp_path / "run" / "checkpoint-2")
    assert os.path.exists(shard)  # reported, not deleted


def test_loader_itself_names_a_shard_it_cannot_read(tmp_path, tiny_model_dir, demo_corpus):
    """load_model without the up-front check (as bench scripts call it): still one ModelLoadError naming the file."""
    from glmkit.config.load import load_config
    from glmkit.model.errors import ModelLoadError
    from glmkit.model.load import load_model

    model_dir, shard = damaged_copy(tiny_model_dir, tmp_path, "truncated")
    cfg = load_config(write_tiny_config(tmp_path, model_dir, demo_corpus))

    with pytest.raises(ModelLoadError) as caught:
        load_model(cfg, "cpu")

    message = str(caught.value)
    assert "\n" not in message and shard in message and "download_model.py --verify-only" in message
