"""Chat data in GLM's own template: exactly the assistant's turns are trained (the marker or EOS that closes
each, never the thinking the template drops), in every input format, packed whole, in the loss and in chat
eval sets, mixed into CPT text and resumed to the bit on one and two processes; bad chat input is one line;
--inspect-data shows the mask; the two recipes (configs/cpt_chat_replay.yaml, configs/sft_after_cpt.yaml) run.

One short run of the "CPT with chat replay" recipe is shared by the run, eval, inspect and SFT tests."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, run_cli
from test_resume import TWO_PROCESSES, assert_same_run, curves

from glmkit.config.load import load_config
from glmkit.config.schema import ConfigError
from glmkit.data import chat
from glmkit.data.prepare import load_tokenizer, prepare_data
from glmkit.data.rows import IGNORE_INDEX, Collator, pack_rows
from glmkit.demo.chat_corpus import conversation as demo_conversation
from glmkit.demo.chat_corpus import write_chat_corpus
from glmkit.run.logs import read_jsonl

# system; user; assistant with thinking; assistant tool call; observation; assistant; user; assistant (thinking)
CONVERSATION = {"messages": [
    {"role": "system", "content": "You are a weather assistant."},
    {"role": "user", "content": "Will it rain in Paris today?"},
    {"role": "assistant", "content": "Let me look that up.",
     "reasoning_content": "The user wants a forecast; I need the weather tool."},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "observation", "content": "{\"rain\": false, \"sky\": \"clear\"}"},
    {"role": "assistant", "content": "No rain today: the sky is clear."},
    {"role": "user", "content": "Thanks! And tomorrow?"},
    {"role": "assistant", "content": "Tomorrow looks dry too.", "reasoning_content": "Same tool result covers it."},
]}
# GLM-4.5's rendering of CONVERSATION, by hand, cut where training switches on or off: a turn is trained from
# after its <|assistant|> to the marker (or EOS) that closes it; the empty <think></think> the template writes
# for dropped history thinking is not; the last turn keeps its thinking, trained.
EXPECTED = [
    ("[gMASK]<sop><|system|>\nYou are a weather assistant.<|user|>\nWill it rain in Paris today?<|assistant|>"
     "\n<think></think>", False),
    ("\nLet me look that up.<|assistant|>", True),
    ("\n<think></think>", False),
    ("\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call><|observation|>",
     True),
    ("\n<tool_response>\n{\"rain\": false, \"sky\": \"clear\"}\n</tool_response><|assistant|>\n<think></think>",
     False),
    ("\nNo rain today: the sky is clear.<|user|>", True),
    ("\nThanks! And tomorrow?<|assistant|>", False),
    ("\n<think>Same tool result covers it.</think>\nTomorrow looks dry too.<|endoftext|>", True),
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def hand_tokens(tokenizer, pieces) -> tuple[list[int], list[bool]]:
    ids, flags = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        flags += [trained] * len(piece)
    return ids, flags


def documents(tokenizer, row: dict, train_on="assistant", max_seq_length=4096, long_conversations="split"):
    renderer = chat.Renderer(tokenizer)
    conversation, reason = chat.conversation(row)
    assert reason is None, reason
    (ids,) = renderer.ids([conversation])
    counts = chat.new_counts()
    docs = renderer.documents(conversation, ids, chat.ChatSettings(train_on, max_seq_length, long_conversations), counts)
    return docs, counts


def test_glm_shaped_conversation_trains_the_hand_derived_positions(tokenizer):
    want_ids, want_flags = hand_tokens(tokenizer, EXPECTED)
    (ids, flags), = documents(tokenizer, CONVERSATION)[0]
    assert ids.tolist() == want_ids  # the template renders GLM-4.5's format, to the token
    positions = np.flatnonzero(flags).tolist()
    assert positions == [i for i, trained in enumerate(want_flags) if trained]
    marker = tokenizer.convert_tokens_to_ids
    closers = [i for i in positions if ids[i] in marker(["<|assistant|>", "<|observation|>", "<|user|>", "<|endoftext|>"])]
    assert [tokenizer.convert_ids_to_tokens(int(ids[i])) for i in closers] == \
        ["<|assistant|>", "<|observation|>", "<|user|>", "<|endoftext|>"]  # every turn's closing token is trained
    assert "I need the weather tool" not in tokenizer.decode(ids)  # history thinking is not even in the tokens
    think = marker("<think>")
    assert [bool(flags[i]) for i in np.flatnonzero(ids == think)] == [False, False, False, True]  # only the kept one

    (_, flags_last), = documents(tokenizer, CONVERSATION, "last_assistant")[0]
    last = hand_tokens(tokenizer, [(text, False) for text, _ in EXPECTED[:-1]] + EXPECTED[-1:])[1]
    assert np.flatnonzero(flags_last).tolist() == [i for i, trained in enumerate(last) if trained]
    (_, flags_all), = documents(tokenizer, CONVERSATION, "all")[0]
    assert flags_all.all() and len(flags_all) == len(want_ids)


def test_long_conversations_split_at_user_turns_or_drop(tokenizer):
    rounds = [[{"role": "user", "content": f"Question {i}: " + "why " * 20},
               {"role": "assistant", "content": f"Answer {i}: " + "because " * 20, "reasoning_content": f"think {i}"}]
              for i in range(4)]
    row = {"messages": [{"role": "system", "content": "Be brief."}] + [m for r in rounds for m in r]}
    (whole, _), = documents(tokenizer, row)[0]
    limit = len(whole) // 2  # two rounds of four cannot fit, with their thinking kept when they end a piece
    pieces, counts = documents(tokenizer, row, max_seq_length=limit)
    assert counts == {"conversations": 1, "split": 1, "pieces": len(pieces), "dropped": 0, "dropped_rounds": 0,
                      "trained_tokens": sum(int(f[1:].sum()) for _, f in pieces)}
    texts = [tokenizer.decode(ids) for ids, _ in pieces]
    assert len(pieces) >= 2 and all(len(ids) <= limit for ids, _ in pieces)
    assert all(t.startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\nQuestion") for t in texts)
    assert [n for t in texts for n in range(4) if f"Answer {n}:" in t] == [0, 1, 2, 3]  # every round, once, whole
    assert all(t.endswith("because<|endoftext|>") for t in texts)
    for ids, flags in pieces:  # each piece is trained as a conversation of its own: its last turn keeps thinking
        assert flags[-1] and "<think>think" in tokenizer.decode(ids[flags])
    assert documents(tokenizer, row, max_seq_length=limit, long_conversations="drop")[1]["dropped"] == 1
    (tail, _), = (tail_docs := documents(tokenizer, row, "last_assistant", limit))[0]
    assert "Answer 3" in tokenizer.decode(tail) and "Answer 0" not in tokenizer.decode(tail)
    assert tail_docs[1]["dropped_rounds"] >= 1
    too_small = documents(tokenizer, row, max_seq_length=20)[1]
    assert (too_small["dropped"], too_small["dropped_rounds"]) == (1, 4)  # no round fits: nothing half-trained


def test_packing_keeps_chat_documents_whole_and_fills_rows_around_them():
    from glmkit.data.rows import pack_layout

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, 3000)
    whole = rng.random(3000) < 0.7  # chat among text
    starts = np.cumsum(lengths) - lengths
    row_ptr, piece_start, piece_len = pack_layout(starts, lengths, 512, True, whole)
    per_row = np.add.reduceat(piece_len.astype(np.int64), row_ptr[:-1])
    assert per_row.max() <= 512 and piece_len.sum() == lengths.sum()  # every token once, no row over
    pieces_of = {s: 0 for s in starts.tolist()}
    for start in piece_start.tolist():
        pieces_of[start] = pieces_of.get(start, 0) + 1
    assert all(pieces_of[int(s)] == 1 for s in starts[whole])  # a chat document is never cut
    assert per_row.sum() / (len(per_row) * 512) > 0.93  # later documents fill the rows around them
    chat_only = pack_layout(starts[whole], lengths[whole], 512, True, np.ones(int(whole.sum()), bool))
    assert chat_only[2].sum() / ((len(chat_only[0]) - 1) * 512) > 0.9


def chat_rows(texts) -> list[dict]:
    rows = [demo_conversation(text, number, answer_chars=160) for number, text in enumerate(texts)]
    rows[0] = {**CONVERSATION, "tools": TOOLS}
    return rows


def write_chat(path, rows) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
        return path
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    if path.endswith(".gz"):
        data = gzip.compress(data)
    elif path.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def chat_config(tmp_path, tiny_model_dir, data_path, **settings):
    from conftest import write_tiny_config

    return write_tiny_config(tmp_path, tiny_model_dir, data_path, {
        "performance.tokenizer_workers": 1, "training.val_fraction": 0.0, "training.max_seq_length": 512, **settings})


def prepared(config):
    cfg = load_config(config)
    return prepare_data(cfg, load_tokenizer(cfg), show_progress=False)


def test_every_input_format_gives_the_same_chat_documents(tmp_path, tiny_model_dir, demo_corpus, capfd):
    from glmkit.data.token_store import Store

    texts = [json.loads(line)["text"] for line in open(demo_corpus, encoding="utf-8")][:24]
    rows = chat_rows(texts)
    folder = tmp_path / "chats"
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"):
        write_chat(folder / f"part{suffix}", rows)
    data = prepared(chat_config(tmp_path, tiny_model_dir, [{"path": str(folder), "format": "chat"}]))
    stores = [Store.open(f["store"]) for f in data.summary["files"]]
    assert [s.meta["format"] for s in stores] == ["jsonl", "gzip", "zstd", "parquet"]
    for store in stores:
        assert store.meta["chat"]["conversations"] == len(rows) and store.meta["bad_lines"] == 0
        np.testing.assert_array_equal(store.tokens(), stores[0].tokens())
        np.testing.assert_array_equal(store.trained(), stores[0].trained())
    assert data.summary["sources"][0]["chat"]["conversations"] == 4 * len(rows)
    # the tools header and the GLM conversation come through every format
    tokenizer = load_tokenizer(load_config(str(tmp_path / "config.yaml")))
    first = stores[0].tokens()[:stores[0].lengths()[0]]
    assert tokenizer.decode(first).startswith("[gMASK]<sop><|system|>\n# Tools")
    bits = np.array(stores[3].trained())
    with open(os.path.join(stores[3].path, "trained.bits"), "r+b") as fh:  # one flipped byte: a wrong mask
        fh.write(bytes([bits[0] ^ 0xFF]))
    glob_data = prepared(chat_config(tmp_path, tiny_model_dir, [{"path": str(folder / "part.*"), "format": "chat"}]))
    assert [f["store"] for f in glob_data.summary["files"]] == [s.path for s in stores]  # the same stores, reused
    assert "(trained.bits does not match its checksum); rebuilding it" in capfd.readouterr().err
    np.testing.assert_array_equal(Store.open(stores[3].path).trained(), bits)  # rebuilt, not trusted
    one = prepared(chat_config(tmp_path, tiny_model_dir, [{"path": str(folder / "part.jsonl"), "format": "chat",
                                                           "train_on": "last_assistant"}]))
    assert one.summary["files"][0]["store"] != stores[0].path  # another mask: another store, never a stale one
    assert one.summary["sources"][0]["trained_tokens"] < data.summary["sources"][0]["trained_tokens"] / 4


def test_packed_chat_batch_loss_equals_a_hand_computation_over_trained_tokens(tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from glmkit.train.step import loss_sum, target_tokens

    texts = ["Module json\n\nJSON encoder and decoder.", "class Path\n\nA filesystem path.",
             "math.sqrt(x)\n\nReturn the square root of x."]
    docs = [documents(tokenizer, row)[0][0] for row in chat_rows(texts)[1:]] + documents(tokenizer, CONVERSATION)[0]
    packed = pack_rows([d.tolist() for d, _ in docs], max_seq_length=192, pad_id=tokenizer.pad_token_id,
                       trained=[f.tolist() for _, f in docs])
    assert len(packed["input_ids"]) < len(docs)  # several conversations share a row
    rows = [dict(zip(("input_ids", "position_ids", "trained"), r)) for r in zip(*packed.values())]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        batch = Collator(tokenizer.pad_token_id, True, "longest", 192, "sdpa")(rows)
        packed_loss, packed_tokens = loss_sum(model, batch).item(), target_tokens(batch)
        total, count = 0.0, 0
        for ids, flags in docs:  # one conversation at a time, the full logits, the trained positions only
            logits = model(input_ids=torch.tensor([ids.tolist()])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for j in np.flatnonzero(flags[1:]) + 1:
                total -= logp[j - 1, int(ids[j])].item()
                count += 1
    assert packed_tokens == count == sum(int(f[1:].sum()) for _, f in docs)
    assert packed_loss / packed_tokens == pytest.approx(total / count, abs=1e-5)
    labels = batch["labels"]
    assert ((labels != IGNORE_INDEX).sum(dim=1) < batch["token_mask"].sum(dim=1)).all()  # prompts are not targets


def test_bad_chat_rows_are_one_line_each_naming_file_and_row(tmp_path, tiny_model_dir):
    good = json.dumps(CONVERSATION)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, json.dumps({"text": "no messages"}),
                               json.dumps({"messages": [{"role": "narrator", "content": "x"},
                                                        {"role": "assistant", "content": "y"}]}),
                               json.dumps({"messages": [{"role": "user", "content": "hello?"}]}), good]) + "\n")
    config = chat_config(tmp_path, tiny_model_dir, [{"path": str(path), "format": "chat"}])
    result = run_cli(["train_qlora.py", "--config", config, "--prepare-data"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for line, reason in [(2, "missing field 'messages'"), (3, "messages[0]: unknown role 'narrator'"),
                         (4, "no assistant turn")]:
        assert f"\n{path}:{line}: {reason}" in result.stderr
    skipped = prepared(chat_config(tmp_path, tiny_model_dir, [{"path": str(path), "format": "chat"}],
                                   **{"training.skip_bad_lines": True}))
    assert skipped.bad_line_count == 3 and skipped.summary["sources"][0]["chat"]["conversations"] == 2

    bare = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns("chat_template.jinja"))
    config = chat_config(tmp_path, str(bare), [{"path": str(path), "format": "chat"}])
    result = run_cli(["train_qlora.py", "--config", config, "--prepare-data"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {bare} has no chat template")
    with pytest.raises(ConfigError, match=r"paths.data_path\[0\].train_on: only chat sources read it"):
        load_config(chat_config(tmp_path, tiny_model_dir, [{"path": str(path), "train_on": "all"}]))


# ---------------------------------------------------------------------------
# The "CPT with chat replay" recipe on the tiny model: trains, evaluates, resumes to the bit
# ---------------------------------------------------------------------------

RUN = {"training.max_steps": 4, "logging.eval_interval": 2, "checkpoint.interval": 2,
       "checkpoint.keep_top_k": 2, "logging.expert_stats_interval": 2, "training.val_fraction": 0.02}


def recipe_config(folder, recipe: str, model_dir: str, files: dict, overrides: dict) -> str:
    """configs/<recipe> with its data files replaced by `files` (by file name), paths inside `folder`."""
    with open(os.path.join(ROOT, "configs", recipe), encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    data["paths"].update(model_dir=model_dir, output_dir=str(folder / "run"), best_adapter_dir=str(folder / "best"),
                         scratch_dir=str(folder / "scratch"))
    for entry in data["paths"]["data_path"] + data["eval"]["sets"]:
        entry["path"] = files[os.path.basename(entry["path"])]
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        data[section][key] = value
    path = folder / recipe
    path.write_text(yaml.safe_dump(data))
    return str(path)


def replay_files(folder, demo_corpus) -> dict:
    texts = [json.loads(line)["text"] for line in open(demo_corpus, encoding="utf-8")]
    write_chat_corpus(str(folder / "demo_chat.jsonl"), texts[:120])
    write_chat_corpus(str(folder / "demo_chat_eval.jsonl"), texts[120:132], 120)
    return {"demo.jsonl": demo_corpus, "demo_chat.jsonl": str(folder / "demo_chat.jsonl"),
            "demo_chat_eval.jsonl": str(folder / "demo_chat_eval.jsonl")}


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory, tiny_model_dir, demo_corpus):
    folder = tmp_path_factory.mktemp("chat-replay")
    config = recipe_config(folder, "cpt_chat_replay.yaml", tiny_model_dir, replay_files(folder, demo_corpus), RUN)
    result = run_cli(["train_qlora.py", "--config", config])
    assert result.returncode == 0, result.stderr[-3000:]
    return {"folder": folder, "config": config, "out": str(folder / "run")}


@pytest.mark.trains
def test_text_and_chat_mix_logs_trained_and_seen_tokens(replay_run):
    train = read_jsonl(os.path.join(replay_run["out"], "logs", "training_log.jsonl"))
    assert [r["step"] for r in train] == list(range(1, 5))
    assert all(r["trained_tokens"] < r["tokens"] for r in train)  # prompts are seen, not trained
    assert train[-1]["trained_tokens_seen"] == sum(r["trained_tokens"] for r in train)
    events = read_jsonl(os.path.join(replay_run["out"], "logs", "events_log.jsonl"))
    cfg = load_config(replay_run["config"])
    data = prepare_data(cfg, load_tokenizer(cfg), show_progress=False)
    assert events[0]["chat"] == data.chat_counts and events[0]["chat"][cfg.paths.data_path[1].path]["conversations"] == 120
    assert events[-1]["trained_tokens_seen"] == train[-1]["trained_tokens_seen"]
    evals = read_jsonl(os.path.join(replay_run["out"], "logs", "eval_log.jsonl"))
    assert [e["step"] for e in evals] == [0, 2, 4] and evals[0]["sets"] == ["val", "chat"]
    # the dashboard shows the chat eval set like any other, and the trained tokens beside the seen ones
    from glmkit.dashboard import create_app

    stats = create_app(os.path.join(replay_run["out"], "logs"), min_poll_interval=0).test_client().get("/api/stats").get_json()
    chat_set = next(row for row in stats["eval_sets"] if row["name"] == "chat")
    assert (chat_set["baseline_loss"], chat_set["latest_loss"]) == (evals[0]["chat/loss"], evals[-1]["chat/loss"])
    assert (stats["tokens_seen"], stats["trained_tokens_seen"]) == (train[-1]["tokens_seen"],
                                                                     train[-1]["trained_tokens_seen"])


@pytest.mark.trains
def test_chat_eval_set_loss_equals_a_hand_computation(replay_run, tokenizer):
    """The base model's loss on the chat eval set (step 0): token-weighted over the trained tokens only."""
    from glmkit.model.load import load_model

    cfg = load_config(replay_run["config"])
    record = read_jsonl(os.path.join(replay_run["out"], "logs", "eval_log.jsonl"))[0]
    model = load_model(cfg).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in open(cfg.eval.sets[0].path, encoding="utf-8"):
            for ids, flags in documents(tokenizer, json.loads(line), max_seq_length=cfg.training.max_seq_length)[0]:
                targets = torch.tensor(ids[1:].astype(np.int64)).masked_fill(torch.tensor(~flags[1:]), IGNORE_INDEX)
                logits = model(input_ids=torch.from_numpy(ids[:-1].astype(np.int64))[None]).logits[0].float()
                total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                                           reduction="sum").item()
                count += int((targets != IGNORE_INDEX).sum())
    assert record["chat/tokens"] == count
    assert record["chat/loss"] == pytest.approx(total / count, abs=2e-5)


@pytest.mark.trains
def test_mix_resumes_to_the_bit_from_a_checkpoint(replay_run, tmp_path):
    for name in ("run", "best", "scratch"):
        shutil.copytree(replay_run["folder"] / name, tmp_path / name, symlinks=True)
    original = load_config(replay_run["config"])
    files = {os.path.basename(s.path): s.path for s in [*original.paths.data_path, *original.eval.sets]}
    config = recipe_config(tmp_path, "cpt_chat_replay.yaml", original.paths.model_dir, files, RUN)
    baseline = curves(replay_run["out"])
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume_from", str(tmp_path / "run" / "checkpoint-2")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(str(tmp_path / "run"), baseline)
    mine = {r["step"]: (r["trained_tokens"], r["trained_tokens_seen"])
            for r in read_jsonl(str(tmp_path / "run" / "logs" / "training_log.jsonl"))}
    assert mine == {r["step"]: (r["trained_tokens"], r["trained_tokens_seen"])
                    for r in read_jsonl(os.path.join(replay_run["out"], "logs", "training_log.jsonl"))}
    changed = run_cli(["train_qlora.py", "--config", config, "--resume", "--set", "training.max_steps=5", "--set",
                       "paths.data_path=" + json.dumps([{"path": files["demo.jsonl"]},
                                                        {"path": files["demo_chat.jsonl"], "weight": 0.5,
                                                         "format": "chat", "train_on": "all"}])])
    assert changed.returncode == 2 and "read as chat (train_on assistant" in changed.stderr.strip().splitlines()[-1]


@pytest.mark.trains
def test_mix_resumes_to_the_bit_on_two_processes_after_a_kill(tmp_path_factory, tiny_model_dir, demo_corpus):
    settings = {"training.max_steps": 4, "logging.eval_interval": 2, "checkpoint.interval": 2,
                "logging.expert_stats_interval": 2, "eval.sets": [], "training.val_fraction": 0.02}
    runs = {}
    for name, env in (("baseline", {}), ("killed", {"GLMKIT_FAULT_KILL_AT": "mid_step:3"})):
        folder = tmp_path_factory.mktemp(f"chat-2proc-{name}")
        config = recipe_config(folder, "cpt_chat_replay.yaml", tiny_model_dir, replay_files(folder, demo_corpus),
                               settings)
        result = run_cli([*TWO_PROCESSES, "train_qlora.py", "--config", config], env=env)
        runs[name] = (folder, config)
        if name == "killed":
            assert result.returncode != 0 and not os.path.exists(folder / "run" / "checkpoint-4")
            result = run_cli([*TWO_PROCESSES, "train_qlora.py", "--config", config, "--resume"])
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(str(runs["killed"][0] / "run"), curves(str(runs["baseline"][0] / "run")))
    start = read_jsonl(str(runs["killed"][0] / "run" / "logs" / "events_log.jsonl"))[0]
    assert start["world_size"] == 2 and start["chat"]


# ---------------------------------------------------------------------------
# Seeing what is trained, the SFT recipe after CPT, chatting with the result
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_inspect_data_marks_the_trained_tokens_of_text_and_chat_rows(replay_run, tokenizer):
    result = run_cli(["train_qlora.py", "--config", replay_run["config"], "--inspect-data", "40", "--json"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["row"] for r in rows] == list(range(40))
    cfg = load_config(replay_run["config"])
    chat_source = cfg.paths.data_path[1].path
    kinds = {segment["source"] for r in rows for segment in r["segments"]}
    assert kinds == {cfg.paths.data_path[0].path, chat_source}  # text and chat rows alike
    for row in rows:
        assert len(row["tokens"]) == sum(s["tokens"] for s in row["segments"]) and row["source"] == row["segments"][0]["source"]
        at = 0
        for segment in row["segments"]:
            tokens = row["tokens"][at:at + segment["tokens"]]
            at += segment["tokens"]
            assert sum(t for _, t in tokens) == segment["trained"]
            if segment["source"] == chat_source:  # the prompt is context, the assistant's reply and its end trained
                assert tokens[0] == ["[gMASK]", False] and tokens[-1] == ["<|endoftext|>", True]
                assert not any(t for _, t in tokens[:tokens.index(["<|assistant|>", False]) + 1])
                assert "<|system|>" not in "".join(text for text, t in tokens if t)
            else:
                assert [t for _, t in tokens] == [False] + [True] * (len(tokens) - 1)
    text = run_cli(["train_qlora.py", "--config", replay_run["config"], "--inspect-data", "2"])
    assert text.returncode == 0 and "trained tokens between ⟦ and ⟧" in text.stdout and "⟦" in text.stdout


@pytest.mark.trains
def test_sft_after_cpt_recipe_and_chatting_with_the_result(replay_run, tmp_path):
    merged = tmp_path / "cpt-merged"
    result = run_cli(["use_adapter.py", "--config", replay_run["config"], "--merge", str(merged), "--dtype", "float32"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(merged / "chat_template.jinja")  # the merged model keeps its template
    files = {"demo_chat.jsonl": str(tmp_path / "sft.jsonl"), "demo_chat_eval.jsonl": str(tmp_path / "sft_eval.jsonl")}
    config = recipe_config(tmp_path, "sft_after_cpt.yaml", str(merged), files,
                           {"training.epochs": 1, "training.max_steps": 2, "logging.eval_interval": 2,
                            "checkpoint.interval": 2})
    made = run_cli(["-m", "glmkit.demo.chat_corpus", "--config", config, "--docs", "60", "--eval-docs", "6"])
    assert made.returncode == 0, made.stderr[-2000:]
    assert "wrote 60 conversations" in made.stdout and "wrote 6 conversations" in made.stdout
    result = run_cli(["train_qlora.py", "--config", config])
    assert result.returncode == 0, result.stderr[-3000:]
    evals = read_jsonl(str(tmp_path / "run" / "logs" / "eval_log.jsonl"))
    assert evals[-1]["step"] == 2 and evals[-1]["select_by"] == "chat" and evals[-1]["chat/tokens"] > 0
    for extra in ([], ["--no-adapter"]):
        reply = run_cli(["use_adapter.py", "--config", config, "--chat", "What is json?", "--system", "Be brief.",
                         "--max-new-tokens", "5", "--dtype", "float32", *extra])
        assert reply.returncode == 0, reply.stderr[-2000:]
        assert reply.stdout.startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\nWhat is json?<|assistant|>")


def test_a_chat_eval_sets_reading_is_in_the_data_fingerprint():
    """Another train_on measures other tokens of the same conversations: a resume sees it as a changed eval set."""
    from glmkit.data.fingerprint import changed_sets, eval_set_differences, eval_set_entry

    reading = "chat (train_on {}, long_conversations split)"
    old = eval_set_entry("talk", "data/talk.jsonl", 5, "ab" * 32, reading.format("assistant"))
    new = eval_set_entry("talk", "data/talk.jsonl", 5, "ab" * 32, reading.format("all"))
    assert eval_set_differences([old], [old]) == []
    assert eval_set_differences([old], [new]) == [f"eval set 'talk' read as {reading.format('assistant')} -> "
                                                  f"{reading.format('all')}"]
    fingerprint = {"val_sha256": "v"}
    assert changed_sets({**fingerprint, "eval_sets": [old]}, {**fingerprint, "eval_sets": [new]}) == ["talk"]
    text = eval_set_entry("plain", "data/plain.jsonl", 5, "cd" * 32)
    assert "reading" not in text  # a text set's entry is as before chat data existed: older checkpoints match
