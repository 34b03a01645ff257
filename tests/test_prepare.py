"""Preparing the corpus: every input format, folders and globs, weighted sources, the content-hash
validation split, bad lines inside compressed shards, one-line refusals through the real CLI, the
warm cache, and one preparer among several processes."""

import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, jsonl_bytes, run_cli, write_shard, write_tiny_config

from glmkit.config.load import load_config
from glmkit.config.schema import ConfigError
from glmkit.data.prepare import prepare_data
from glmkit.data.rows import DataError
from glmkit.run.logs import read_jsonl


def demo_texts(demo_corpus) -> list[str]:
    with open(demo_corpus, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


@pytest.fixture
def config_for(tmp_path, tiny_model_dir):
    """A tiny config over data_path (anything paths.data_path takes), one tokenizer worker unless told."""

    def make(data_path, overrides=None, name="config.yaml"):
        settings = {"performance.tokenizer_workers": 1, "training.val_fraction": 0.1, **(overrides or {})}
        return write_tiny_config(tmp_path, tiny_model_dir, data_path, settings, name=name)

    return make


def prepared(config_path):
    from glmkit.data.prepare import load_tokenizer

    cfg = load_config(config_path)
    return prepare_data(cfg, load_tokenizer(cfg), show_progress=False)


def all_rows(rows) -> list[tuple]:
    return [tuple(rows[i]["input_ids"]) for i in range(len(rows))]


def test_every_format_gives_the_same_rows_and_the_trainers_tokens(tmp_path, config_for, demo_corpus, tiny_model_dir):
    from transformers import AutoTokenizer

    texts = demo_texts(demo_corpus)[:120]
    results = {}
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"):
        shard = write_shard(tmp_path / suffix.strip(".").replace(".", "_") / f"shard{suffix}", texts)
        data = prepared(config_for(shard, {"training.packing": False, "training.max_seq_length": 8192}))
        assert data.summary["files"][0]["format"] == {".jsonl": "jsonl", ".jsonl.gz": "gzip", ".jsonl.zst": "zstd",
                                                      ".parquet": "parquet"}[suffix]
        results[suffix] = (all_rows(data.train_rows), all_rows(data.val_rows))
    reference = results[".jsonl"]
    assert all(value == reference for value in results.values())
    # Unpacked rows are whole documents: exactly what the trainer's tokenizer makes of each text, plus EOS.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = {tuple(ids + [tokenizer.eos_token_id]) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]}
    assert set(reference[0]) | set(reference[1]) == expected
    assert len(reference[0]) + len(reference[1]) == 120 and len(reference[1]) > 0


def test_folders_and_globs_pick_supported_files_in_sorted_order(tmp_path, config_for, demo_corpus):
    texts = demo_texts(demo_corpus)
    corpus = tmp_path / "corpus"
    b = write_shard(corpus / "b.jsonl.gz", texts[:40])
    a = write_shard(corpus / "a.jsonl", texts[40:80])
    c = write_shard(corpus / "sub" / "c.parquet", texts[80:120])
    (corpus / "README.md").write_text("not data")
    write_shard(corpus / ".hidden.jsonl", texts[120:130])
    folder = prepared(config_for(str(corpus)))
    assert [f["path"] for f in folder.summary["files"]] == [a, b, c]
    assert folder.summary["sources"][0]["docs"] == 120
    by_glob = prepared(config_for(str(corpus / "*.jsonl*"), name="glob.yaml"))
    assert [f["path"] for f in by_glob.summary["files"]] == [a, b]
    recursive = prepared(config_for(str(corpus / "**" / "*.parquet"), name="rec.yaml"))
    assert [f["path"] for f in recursive.summary["files"]] == [c]


def test_weights_repeat_sources_and_fractions_take_a_fixed_subset(tmp_path, config_for, demo_corpus):
    texts = demo_texts(demo_corpus)
    domain = write_shard(tmp_path / "domain.jsonl", texts[:60])
    general = write_shard(tmp_path / "general" / "g.jsonl.zst", texts[60:260])
    sources = [{"path": domain, "weight": 2}, {"path": str(tmp_path / "general"), "weight": 0.25}]
    data = prepared(config_for(sources, {"training.packing": False, "training.max_seq_length": 8192}))
    dom, gen = data.summary["sources"]
    assert dom["train_docs_per_epoch"] == 2 * dom["train_docs"]
    assert 0 < gen["train_docs_per_epoch"] < gen["train_docs"] / 2  # about a quarter, never the whole source
    rows = all_rows(data.train_rows)
    assert len(rows) == dom["train_docs_per_epoch"] + gen["train_docs_per_epoch"]
    domain_rows = {r for r in rows if rows.count(r) == 2}
    assert len(domain_rows) == dom["train_docs"]  # every domain training document exactly twice
    # The fraction is a function of the documents and the seed: the same subset with other row shapes.
    packed = prepared(config_for(sources, {"training.max_seq_length": 128}, name="packed.yaml"))
    assert packed.summary["sources"][1]["train_docs_per_epoch"] == gen["train_docs_per_epoch"]
    assert packed.summary["sources"][1]["train_tokens_per_epoch"] == gen["train_tokens_per_epoch"]
    with pytest.raises(ConfigError, match=r"paths.data_path\[1\].weight: must be > 0 \(passes over .*, got 0.0"):
        load_config(config_for([domain, {"path": general, "weight": 0}], name="zero.yaml"))


def test_validation_split_stays_put_when_a_shard_is_added(tmp_path, config_for, demo_corpus):
    texts = demo_texts(demo_corpus)
    corpus = tmp_path / "corpus"
    for i in range(3):
        write_shard(corpus / f"part-{i}.jsonl", texts[i * 100:(i + 1) * 100])
    settings = {"training.packing": False, "training.max_seq_length": 8192, "training.val_fraction": 0.2}
    before = prepared(config_for(str(corpus), settings))
    write_shard(corpus / "part-3.jsonl.gz", texts[300:400])
    after = prepared(config_for(str(corpus), settings, name="after.yaml"))
    val_before, val_after = set(all_rows(before.val_rows)), set(all_rows(after.val_rows))
    assert val_before and val_before < val_after  # every earlier validation document is still held out
    assert not val_before & set(all_rows(after.train_rows))
    assert [f["val_docs"] for f in after.summary["files"][:3]] == [f["val_docs"] for f in before.summary["files"]]
    assert before.fingerprint["val_sha256"] != after.fingerprint["val_sha256"]


def test_bad_lines_in_a_gz_shard_are_named_by_line(tmp_path, config_for, demo_corpus):
    texts = demo_texts(demo_corpus)
    good = write_shard(tmp_path / "corpus" / "a.jsonl", texts[:50])
    lines = [texts[50], {"raw": "{broken"}, texts[51], {"raw": json.dumps({"body": "x"})},
             {"raw": '{"text": "abc \\ud800"}'}, {"raw": ""}, texts[52], {"raw": json.dumps({"text": "  "})}]
    shard = write_shard(tmp_path / "corpus" / "b.jsonl.gz", texts[53:90] + lines)
    config = config_for(str(tmp_path / "corpus"))
    with pytest.raises(DataError) as info:
        prepared(config)
    message = str(info.value)
    assert message.startswith(f"4 bad line(s) in 1 file(s) ({shard}: 4); fix them or set training.skip_bad_lines: true")
    assert f"{shard}:39: invalid JSON" in message
    assert f"{shard}:41: missing field 'text'" in message
    assert f"{shard}:42: field 'text' holds an unpaired surrogate '\\ud800'" in message  # not a UnicodeEncodeError
    assert f"{shard}:45: field 'text' is empty" in message
    data = prepared(config_for(str(tmp_path / "corpus"), {"training.skip_bad_lines": True}, name="skip.yaml"))
    files = {f["path"]: f for f in data.summary["files"]}
    assert (files[good]["bad_lines"], files[shard]["bad_lines"]) == (0, 4)
    assert files[shard]["docs"] == 37 + 3 and data.bad_line_count == 4


def test_prepare_data_cli_summary_warm_cache_and_added_shard(tmp_path, config_for, demo_corpus):
    texts = demo_texts(demo_corpus)
    corpus = tmp_path / "corpus"
    write_shard(corpus / "a.jsonl", texts[:100])
    write_shard(corpus / "b.jsonl.zst", texts[100:200] + [{"raw": "{nope"}])
    config = config_for(str(corpus), {"training.skip_bad_lines": True, "performance.tokenizer_workers": 2})
    first = run_cli(["train_qlora.py", "--config", config, "--prepare-data"])
    assert first.returncode == 0, first.stderr[-2000:]
    out = first.stdout
    assert "files: 2 (" in out and f"source {corpus} (weight 1): 2 file(s), 200 documents" in out
    assert "bad lines: 1 (skipped)" in out and f"  {corpus / 'b.jsonl.zst'}: 1" in out
    assert "% real tokens" in out and "bytes per token" in out and "elapsed:" in out
    assert "data: tokenized 2 file(s)" in first.stderr and "2 worker(s)" in first.stderr
    assert not os.path.exists(tmp_path / "run")  # no model was loaded, nothing was trained
    warm = run_cli(["train_qlora.py", "--config", config, "--prepare-data"])
    assert warm.returncode == 0 and "(the cache was warm)" in warm.stdout and "tokenized" not in warm.stderr
    assert warm.stdout.split("elapsed:")[0] == out.split("elapsed:")[0]
    write_shard(corpus / "c.parquet", texts[200:250])
    grown = run_cli(["train_qlora.py", "--config", config, "--prepare-data"])
    assert grown.returncode == 0 and "data: tokenized 1 file(s)" in grown.stderr  # only the new shard
    assert "files: 3 (" in grown.stdout


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def _no_column(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text"]}), path)


BAD_INPUTS = {
    # name: (data_path relative to tmp, setup(tmp) -> None, words the one line must hold)
    "nothing matched": ("corpus/*.jsonl.gz", lambda tmp: os.makedirs(tmp / "corpus"), ["matches no file"]),
    "no such file": ("missing.jsonl", lambda tmp: None, ["no such file or folder"]),
    "unsupported extension": ("notes.txt", lambda tmp: (tmp / "notes.txt").write_text("hello"),
                              ["unsupported extension", ".jsonl.zst"]),
    "truncated gz": ("t.jsonl.gz", lambda tmp: _truncate(write_shard(tmp / "t.jsonl.gz", ["word " * 40] * 3000)),
                     ["corrupt or truncated gzip", "re-download or re-compress"]),
    "truncated zst": ("t.jsonl.zst", lambda tmp: _truncate(write_shard(tmp / "t.jsonl.zst", ["word " * 40] * 3000)),
                      ["corrupt or truncated zstd", "re-download or re-compress"]),
    "parquet without column": ("p.parquet", lambda tmp: _no_column(tmp / "p.parquet"),
                               ["no column 'text'", "training.text_field"]),
    "gzip named .jsonl": ("z.jsonl", lambda tmp: (tmp / "z.jsonl").write_bytes(gzip.compress(jsonl_bytes(["a"] * 500))),
                          ["gzip-compressed but named .jsonl", "rename it to z.jsonl.gz"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file_exit_2(case, tmp_path, config_for):
    relative, setup, words = BAD_INPUTS[case]
    setup(tmp_path)
    target = str(tmp_path / relative)
    result = run_cli(["train_qlora.py", "--config", config_for(target), "--prepare-data"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and target in errors[0], result.stderr[-2000:]
    for word in words:
        assert word in errors[0]
    assert errors[0] == result.stderr.strip().splitlines()[-1]


def test_source_weight_of_zero_or_less_is_a_config_error(tmp_path, config_for, demo_corpus):
    config = config_for([{"path": demo_corpus, "weight": 1}, {"path": demo_corpus + ".gz", "weight": -1}])
    result = run_cli(["train_qlora.py", "--config", config, "--prepare-data"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"config error: paths.data_path[1].weight: must be > 0 (passes over {demo_corpus}.gz "
                                     f"per epoch; remove the source to leave it out), got -1.0")


@pytest.mark.trains
def test_two_processes_tokenize_once_and_both_map_the_cache(tmp_path, config_for, demo_corpus):
    texts = demo_texts(demo_corpus)
    corpus = tmp_path / "corpus"
    for i, suffix in enumerate((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        write_shard(corpus / f"part-{i}{suffix}", texts[i * 130:(i + 1) * 130])
    config = config_for(str(corpus), {"training.max_steps": 2, "logging.eval_interval": 2,
                                      "checkpoint.interval": 2, "training.val_fraction": 0.05})
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = run_cli([*launch, "train_qlora.py", "--config", config], env={"ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("data: tokenized 3 file(s)") == 1  # one process tokenized; the other only mapped
    scratch = tmp_path / "scratch" / "tokenized"
    assert len(os.listdir(scratch / "files")) == 3 and len(os.listdir(scratch / "rows")) == 1
    start = read_jsonl(str(tmp_path / "run" / "logs" / "events_log.jsonl"))[0]
    assert start["world_size"] == 2 and start["bad_lines"] == 0
    train = read_jsonl(str(tmp_path / "run" / "logs" / "training_log.jsonl"))
    assert [r["step"] for r in train] == [1, 2] and all(0 < r["tokens"] <= 2 * 2 * 2 * 256 for r in train)


def test_config_shapes_of_data_path(tmp_path):
    doc = {"paths": {"data_path": [{"path": "a/*.jsonl.zst", "weight": 2.5}, "b/", {"weight": 1},
                                   {"path": "c", "wieght": 1}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert info.value.problems == [
        "paths.data_path[2].path: missing or not a string; each source is {path: FILE|FOLDER|GLOB, weight: N}",
        "paths.data_path[3].wieght: unknown key; did you mean paths.data_path[3].weight?"]
    doc["paths"]["data_path"] = doc["paths"]["data_path"][:2]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_config(tmp_path / "c.yaml")
    assert [(s.path, s.weight) for s in cfg.paths.data_path] == [(str(tmp_path / "a/*.jsonl.zst"), 2.5),
                                                                  (str(tmp_path / "b"), 1.0)]


# ---------------------------------------------------------------------------
# The cache verifies itself, and forgets what can never be reused (issue 25)
# ---------------------------------------------------------------------------

def test_damaged_cache_is_rebuilt_and_stores_of_changed_files_are_removed(tmp_path, config_for, demo_corpus, capfd):
    """A truncated tokens.u32 used to be "warm": --prepare-data exit 0, then an IndexError mid-run; so did one
    zeroed at its size (a power cut's image), which trained on token id 0."""
    texts = demo_texts(demo_corpus)
    kept = write_shard(tmp_path / "other" / "kept.jsonl", texts[:40])
    prepared(config_for(kept, name="other.yaml"))  # another run's store over a file that stays as it is
    shard = write_shard(tmp_path / "corpus" / "a.jsonl", texts[40:160])
    config = config_for(shard)
    first = prepared(config)
    reference = (all_rows(first.train_rows), all_rows(first.val_rows))
    store = first.summary["files"][0]["store"]
    capfd.readouterr()

    def damaged_then_rebuilt(damage, words, tokenized=True):
        damage()
        again = prepared(config)
        err = capfd.readouterr().err
        assert words in err and ("data: tokenized 1 file(s)" in err) == tokenized, err
        assert again.prepared_here and (all_rows(again.train_rows), all_rows(again.val_rows)) == reference

    tokens = os.path.join(store, "tokens.u32")
    damaged_then_rebuilt(lambda: os.truncate(tokens, os.path.getsize(tokens) - 4),
                         f"data: token store {store} is damaged (tokens.u32 holds ")
    size = os.path.getsize(tokens)

    def power_cut_image():  # what an unsynced write can come back as: the full size, a third of it zeros
        with open(tokens, "r+b") as fh:
            fh.seek(size // 3)
            fh.write(b"\0" * (size // 3))

    damaged_then_rebuilt(power_cut_image, f"data: token store {store} is damaged (tokens.u32 does not match its "
                                          f"checksum in bytes 0 to {size:,} of {size:,}); rebuilding it\n")
    digests = os.path.join(store, "digests.b16")

    def flip_a_byte():
        with open(digests, "r+b") as fh:
            fh.seek(100)
            byte = fh.read(1)
            fh.seek(100)
            fh.write(bytes([byte[0] ^ 0xFF]))

    damaged_then_rebuilt(flip_a_byte, "(digests.b16 does not match its checksum); rebuilding it")
    piece_len = os.path.join(first.cache_dir, "train.piece_len.npy")
    damaged_then_rebuilt(lambda: os.truncate(piece_len, os.path.getsize(piece_len) - 8),
                         f"data: rows folder {first.cache_dir} is damaged (unreadable: ValueError", tokenized=False)
    assert not prepared(config).prepared_here  # verified and warm again

    # The corpus changes: its old store and rows can never be hit again, so they go; the other run's stay.
    write_shard(shard, texts[40:170])
    changed = prepared(config)
    err = capfd.readouterr().err
    assert "data: removed 1 token store(s) of input files that changed or are gone (" in err
    files_dir = tmp_path / "scratch" / "tokenized" / "files"
    stores = {json.load(open(files_dir / name / "meta.json"))["path"] for name in os.listdir(files_dir)}
    assert stores == {kept, shard} and not os.path.exists(store) and not os.path.exists(first.cache_dir)
    assert len(os.listdir(tmp_path / "scratch" / "tokenized" / "rows")) == 2 and changed.cache_dir != first.cache_dir


def test_the_tokens_checksum_is_per_block_and_names_the_damaged_one(tmp_path):
    """Fed in pieces that straddle block boundaries, as the writer feeds it; verified block by block."""
    import numpy as np

    from glmkit.data.token_store import BlockCrc, _tokens_damage

    data = np.random.default_rng(0).integers(0, 2**32, 2600, dtype=np.uint32)  # 10,400 bytes
    crc = BlockCrc(block_bytes=4000)
    for piece in np.split(data, [7, 1000, 1001, 2600]):
        crc.update(piece)
    path = tmp_path / "tokens.u32"
    path.write_bytes(data.tobytes())
    recorded = crc.record()
    assert len(recorded["blocks"]) == 3 and _tokens_damage(str(path), recorded) is None
    with open(path, "r+b") as fh:
        fh.seek(4100)
        fh.write(b"\0" * 8)
    assert _tokens_damage(str(path), recorded) == ("tokens.u32 does not match its checksum in bytes 4,000 to 8,000 "
                                                   "of 10,400")


@pytest.mark.parametrize("layout", ["same path twice", "a folder and a file inside it", "a glob and a file"])
def test_overlapping_sources_are_refused_with_their_effective_weight(tmp_path, layout):
    from glmkit.data.sources import resolve_sources

    a = write_shard(tmp_path / "corpus" / "a.jsonl", ["one", "two"])
    write_shard(tmp_path / "corpus" / "b.jsonl", ["three"])
    first, second = {"same path twice": (a, a), "a folder and a file inside it": (str(tmp_path / "corpus"), a),
                     "a glob and a file": (str(tmp_path / "corpus" / "*.jsonl"), a)}[layout]
    cfg_sources = [{"path": first, "weight": 1}, {"path": second, "weight": 3}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"paths": {"data_path": cfg_sources}}))
    cfg = load_config(tmp_path / "c.yaml")
    with pytest.raises(DataError) as info:
        resolve_sources(cfg.paths.data_path, "text")
    relation = "is the same source as" if first == second else "overlaps"
    assert str(info.value) == (f"paths.data_path[1] ({second}) {relation} paths.data_path[0] ({first}): both take "
                               f"{a}, which would count 1 + 3 = 4 passes per epoch; list each file in one source "
                               f"and give that source the weight you mean")


def test_symlink_loops_and_unreadable_files_are_one_line(tmp_path):
    """A looping link or an unreadable file among the inputs used to be an OSError traceback."""
    from glmkit.data.sources import resolve_sources

    corpus = tmp_path / "corpus"
    write_shard(corpus / "a.jsonl", ["one", "two"])
    os.symlink(corpus / "b.jsonl", corpus / "c.jsonl")
    os.symlink(corpus / "c.jsonl", corpus / "b.jsonl")
    with pytest.raises(DataError) as info:
        resolve_sources(str(corpus), "text")
    assert str(info.value) == (f"{corpus / 'b.jsonl'}: a symlink loop (a link that leads back to itself); fix it "
                               f"(permissions, the link) or leave it out of paths.data_path")
    with pytest.raises(DataError, match=r"c.jsonl: a symlink loop \(a link that leads back to itself\); set "):
        resolve_sources(str(corpus / "c.jsonl"), "text")
    # Unreadable: root reads any file, so as root the check runs without the capabilities that let it.
    secret = write_shard(tmp_path / "shared" / "secret.jsonl", ["hidden"])
    os.chmod(secret, 0)
    code = ("from glmkit.data.sources import resolve_sources, DataError\n"
            f"try: resolve_sources({str(tmp_path / 'shared')!r}, 'text')\nexcept DataError as e: print(e)")
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv (util-linux): root reads any file, so none is unreadable")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.stdout.strip() == (f"{secret}: cannot be read (Permission denied); fix it (permissions, the link) "
                                     f"or leave it out of paths.data_path"), result.stderr[-2000:]


def test_truncated_gzip_is_located_near_the_break_and_dictionary_strings_are_text(tmp_path, config_for):
    """A truncated .gz said "near line 1" when the break was ~line 1,446; a dictionary-encoded parquet column
    (what pandas writes for a categorical) was refused as "not text"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from glmkit.data.sources import read_chunks, resolve_sources

    shard = write_shard(tmp_path / "t.jsonl.gz", [f"word {i} " * 40 for i in range(800)])
    _truncate(shard)
    with pytest.raises(DataError) as info:
        list(read_chunks(resolve_sources(shard, "text")[0].files[0], "text"))
    line = int(str(info.value).split("near line ")[1].split()[0])
    with gzip.open(shard, "rb") as fh:  # how far the archive really reads
        readable = 0
        with pytest.raises(EOFError):
            for _ in fh:
                readable += 1
    assert readable > 100 and line == readable + 1, (line, readable)  # the first line it could not read, far past 1
    texts = [f"document {i % 7} about parquet" for i in range(60)]
    table = pa.table({"text": pa.array(texts).dictionary_encode()})
    assert pa.types.is_dictionary(table.schema.field("text").type)
    pq.write_table(table, tmp_path / "dict.parquet")
    plain = write_shard(tmp_path / "plain" / "plain.parquet", texts)
    dictionary = prepared(config_for(str(tmp_path / "dict.parquet"), {"training.val_fraction": 0}))
    reference = prepared(config_for(plain, {"training.val_fraction": 0}, name="plain.yaml"))
    assert dictionary.summary["files"][0]["docs"] == 60
    assert all_rows(dictionary.train_rows) == all_rows(reference.train_rows)


def test_an_epoch_whose_layout_outgrows_memory_is_refused_before_allocating():
    """Weights within bounds can still ask for more than the machine has (a huge corpus x 1000): the layout's
    size is known from the counts alone, so it is compared with this machine's MemAvailable first."""
    from glmkit.data.prepare import _available_memory, _check_layout_fits, layout_bytes

    available = _available_memory()
    if available is None:
        pytest.skip("no /proc/meminfo here: the check is skipped where the available memory is unknown")
    docs = available // 40  # more than fits: at least 48 bytes a document
    needed = layout_bytes(docs, docs * 100, 4096, packing=True)
    assert needed > available
    with pytest.raises(DataError, match=rf"^data/a.jsonl \(x1000\): the source weights make an epoch of {docs:,} "
                                        r"training documents, whose row layout needs about [\d.]+ GiB of memory "
                                        r"while [\d.]+ GiB are available; lower the weights in paths.data_path"):
        _check_layout_fits(needed, docs, "data/a.jsonl (x1000)")
    _check_layout_fits(layout_bytes(400_000, 236_000_000, 256, packing=True), 400_000, "fits")  # 55 MB


def test_tokenizer_workers_of_a_killed_preparation_exit_quietly(tmp_path, config_for):
    """SIGKILL the preparer while its pool tokenizes: every worker is gone within seconds, printing nothing."""
    import psutil

    corpus = tmp_path / "big.jsonl"
    write_shard(corpus, [f"document {i}: " + "words that take the tokenizer a while " * 400 for i in range(800)])
    config = config_for(str(corpus), {"performance.tokenizer_workers": 2})
    log = tmp_path / "prepare.log"
    with open(log, "wb") as out:
        preparer = subprocess.Popen([sys.executable, "train_qlora.py", "--config", config, "--prepare-data"],
                                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        workers = []
        while time.monotonic() < deadline and len(workers) < 2 and preparer.poll() is None:
            workers = [c for c in psutil.Process(preparer.pid).children() if "multiprocessing" in " ".join(c.cmdline())
                       and "resource_tracker" not in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert len(workers) == 2, f"the pool did not start: {log.read_text()[-2000:]}"
        time.sleep(1.0)  # the workers are tokenizing
    finally:
        preparer.kill()
        preparer.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived their killed preparer: {[p.pid for p in alive]}"
    assert "Traceback" not in log.read_text()
