"""The multi-token-prediction (MTP) layer on the tiny model: acceptance against a hand computation, the MTP loss
against transformers' own on the same weights (and the adapter loaded by plain peft), SIGKILL and exact resume with
mtp.train, the merge into layer N that transformers' generate(use_mtp=True) drafts with, the serving export's
README, and a model folder whose config and weights disagree about the layer (one line, exit 2).

One short run with mtp.train and the shipped training_config.yaml's LoRA settings (r 16, alpha 32, dropout 0.05,
attention) is shared by every test here; FSDP against DDP with mtp.train is in tests/test_fsdp.py's chain.
"""

import json
import os
import shutil
import signal

import pytest
import torch
from conftest import run_cli, shared_training_run
from safetensors.torch import load_file, save_file

from glmkit.data.rows import IGNORE_INDEX
from glmkit.run.logs import latest_per_step, read_jsonl

STEPS = 8
# The shipped recipe's LoRA (training_config.yaml) and mtp defaults, with the MTP layer trained.
SETTINGS = {"mtp.train": True, "lora.r": 16, "lora.alpha": 32, "training.max_steps": STEPS,
            "logging.eval_interval": 4, "checkpoint.interval": 4, "checkpoint.keep_top_k": 2,
            "logging.expert_stats_interval": 4}
MTP_LAYER = 3  # the tiny model has 3 decoder layers: its MTP layer is model.layers.3


@pytest.fixture(scope="module")
def mtp_run(tmp_path_factory, tiny_model_dir, demo_corpus):
    return shared_training_run(tmp_path_factory, "mtp-train", tiny_model_dir, demo_corpus, SETTINGS)


def records(out, name):
    return latest_per_step(read_jsonl(os.path.join(out, "logs", name)))


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


def packed_batch(cfg, tokenizer, texts: list[str]) -> tuple[dict, list[list[int]]]:
    """The collator's batch of `texts` packed into rows (documents spill over rows, the last row padded)."""
    from glmkit.data.rows import make_collator, pack_rows

    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    packed = pack_rows(docs, cfg.training.max_seq_length, tokenizer.pad_token_id)
    rows = [{"input_ids": i, "position_ids": p} for i, p in zip(packed["input_ids"], packed["position_ids"])]
    return make_collator(tokenizer, cfg)(rows), docs


def documents_of(batch) -> list[torch.Tensor]:
    """The batch's document pieces, read back from the positions (a piece restarts at 0, padding is -1... here 0
    with the token mask off)."""
    pieces = []
    for ids, pos, real in zip(batch["input_ids"], batch["position_ids"], batch["token_mask"]):
        starts = [j for j in range(len(ids)) if real[j] and pos[j] == 0] + [int(real.sum())]
        pieces += [ids[a:b] for a, b in zip(starts[:-1], starts[1:])]
    return pieces


def demo_texts(corpus: str, count: int) -> list[str]:
    with open(corpus, encoding="utf-8") as fh:
        return [json.loads(line)["text"][:300 + 97 * i] for i, line in zip(range(count), fh)]


# ---------------------------------------------------------------------------
# Acceptance, by hand
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_tiny_checkpoint_mtp_layer_and_the_trainer_records(mtp_run):
    """Every eval (step 0 included) measures each set's acceptance and MTP loss; a trained step logs its MTP loss."""
    evals = records(mtp_run.out, "eval_log.jsonl")
    assert [r["step"] for r in evals] == [0, 4, 8]
    for r in evals:
        assert 0 <= r["val/mtp_acceptance"] <= 1 and r["val/mtp_positions"] > 0.9 * r["val/tokens"]
        assert 5 < r["val/mtp_loss"] < 9
    train = records(mtp_run.out, "training_log.jsonl")
    assert all(5 < r["mtp_loss"] < 9 for r in train)
    # trained: its loss falls (the random tiny MTP layer starts near log(2048) = 7.6)
    assert evals[-1]["val/mtp_loss"] < evals[0]["val/mtp_loss"] - 0.02
    start = read_jsonl(os.path.join(mtp_run.out, "logs", "events_log.jsonl"))[0]
    by_group = start["model_audit"]["trainable_params_by_group"]
    assert by_group["mtp"] == 16 * (2 * (128 + 128) + 2 * (128 + 64)) == by_group["attention"] // 3
    assert start["model_audit"]["groups"]["mtp"]["params"] > 8 * 3 * 64 * 128


def identity_mtp_model(tiny_model_dir, folder) -> str:
    """A copy of the tiny model whose MTP layer passes the trunk's hidden state through: eh_proj = [0 | I] picks
    hnorm(h), and the block's attention output and MLP outputs are zero (all exact in NF4). Its draft for j+2 is
    then the trunk's own next token at j, so it is accepted wherever the model predicts the same token at j and
    j+1: a real, known share, not the ~0 of a random layer."""
    shutil.copytree(tiny_model_dir, folder)
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
    prefix = f"model.layers.{MTP_LAYER}."
    for shard in sorted({f for k, f in index.items() if k.startswith(prefix)}):
        path = os.path.join(folder, shard)
        tensors = load_file(path)
        for key, tensor in tensors.items():
            part = key.removeprefix(prefix)
            if part == "eh_proj.weight":
                hidden = tensor.shape[0]
                tensors[key] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1).to(tensor.dtype)
            elif part in ("self_attn.o_proj.weight", "mlp.shared_experts.down_proj.weight") or \
                    (part.startswith("mlp.experts.") and part.endswith("down_proj.weight")):
                tensors[key] = torch.zeros_like(tensor)
        save_file(tensors, path, metadata={"format": "pt"})
    return str(folder)


def test_acceptance_equals_a_hand_computation_on_a_fixed_batch(make_config, tiny_model_dir, demo_corpus, tmp_path):
    """The kit's acceptance and MTP loss on a packed batch (4 documents over 128-token rows) equal a hand
    computation that runs each document alone, full-vocabulary logits, position by position."""
    from transformers import AutoTokenizer

    from glmkit.config.load import load_config
    from glmkit.model.load import load_model
    from glmkit.train.mtp import eval_sums

    model_dir = identity_mtp_model(tiny_model_dir, tmp_path / "identity-mtp")
    cfg = load_config(make_config({"paths.model_dir": model_dir, "training.max_seq_length": 128}))
    model = load_model(cfg).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch, _ = packed_batch(cfg, tokenizer, demo_texts(demo_corpus, 4))
    assert batch["input_ids"].shape[0] >= 3 and not batch["token_mask"][-1].all()  # spilled over rows, padded
    kit = eval_sums(model, batch)

    accepted = positions = 0
    loss = torch.zeros((), dtype=torch.float64)
    layer, decoder = model.layers[0], model.model
    with torch.no_grad():
        for doc in documents_of(batch):
            n = len(doc)
            if n < 3:
                continue
            ids = doc[None]
            h = decoder(input_ids=ids).last_hidden_state
            own = model.lm_head(h).argmax(-1)[0]  # the model's greedy next token at each position
            pos = torch.arange(n)[None]
            embeds = decoder.embed_tokens(ids[:, 1:])  # the token after each position j < n - 1
            draft_hidden = layer(embeds, h[:, :-1], position_embeddings=decoder.rotary_emb(embeds, pos[:, 1:]),
                                 attention_mask=None, position_ids=pos[:, 1:], past_key_values=None)
            logits = model.lm_head(draft_hidden)[0, : n - 2]  # drafts for tokens 2 .. n-1
            accepted += int((logits.argmax(-1) == own[1 : n - 1]).sum())
            positions += n - 2
            loss += torch.nn.functional.cross_entropy(logits.double(), doc[2:], reduction="sum")
    assert (kit.mtp_positions, kit.mtp_accepted) == (positions, accepted)
    assert 0.05 < accepted / positions < 0.95  # a share that can be wrong, not 0 or 1
    assert float(kit.mtp_loss) == pytest.approx(float(loss), rel=1e-5)


def test_targets_stay_inside_documents():
    from glmkit.train.mtp import mtp_targets

    labels = torch.tensor([[IGNORE_INDEX, 11, 12, 13, IGNORE_INDEX, 21, 22, IGNORE_INDEX]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]])  # documents of 4 and 3 tokens, then padding
    got = mtp_targets({"labels": labels, "position_ids": positions})
    assert got.tolist() == [[12, 13, IGNORE_INDEX, IGNORE_INDEX, 22, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


# ---------------------------------------------------------------------------
# mtp.train: transformers' own MTP loss on the same weights, and plain peft
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_mtp_loss_equals_transformers_own_on_the_same_weights(mtp_run, make_config, tiny_model_dir, demo_corpus):
    """The trained adapter on the base without 4-bit (the same weights both sides): the kit's MTP loss on a packed
    batch equals transformers' MtpModel loss path (forward_layer, _project_to_logits, its ForCausalLM loss with
    shift_labels) run per document. Plain peft loads the one adapter, trunk and MTP LoRA together, onto
    transformers' model with MtpModel's layers where MtpModel keeps them (`layers`)."""
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_layers import MtpModel

    from glmkit.config.load import load_config
    from glmkit.model.load import load_model, prepare_for_training
    from glmkit.train.mtp import lm_and_mtp_loss_sums

    adapter = os.path.join(mtp_run.out, f"final-checkpoint-{STEPS}")
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    cfg = load_config(make_config({**SETTINGS, "lora.dropout": 0.0, "quantization.load_in_4bit": False,
                                   "quantization.quantize_experts": False, "training.max_seq_length": 128}))
    kit = prepare_for_training(load_model(cfg), cfg).eval()
    set_peft_model_state_dict(kit, weights)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch, _ = packed_batch(cfg, tokenizer, demo_texts(demo_corpus, 3))
    with torch.no_grad():
        _, ours = lm_and_mtp_loss_sums(kit, batch)

    main = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # transformers finds the MTP weights by its own pattern for GLM's real layer numbers (46, 92); the tiny model's
    # MTP layer is number 3
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{MTP_LAYER}\..*"]
    mtp = MtpModel.from_pretrained(main).eval()
    main.layers = mtp.layers
    model = PeftModel.from_pretrained(main, adapter).eval()
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    theirs = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for doc in documents_of(batch):
            ids = doc[None]
            h = model(ids, output_hidden_states=True).hidden_states[-1]
            positions = torch.arange(1, len(doc))[None]  # MTPCandidateGenerator: the positions of tokens 1..n-1
            hidden = mtp.forward_layer(0, h[:, :-1], positions, None, input_ids=ids[:, 1:])
            logits = mtp._project_to_logits(hidden)
            labels = torch.nn.functional.pad(doc[2:], (0, 1), value=-100)[None]  # token j+2 at j; none at the end
            theirs += mtp.loss_function(logits, labels, vocab_size=logits.shape[-1], shift_labels=labels,
                                        num_items_in_batch=1).double()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


# ---------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_sigkill_then_resume_is_bit_identical(mtp_run, make_config, tmp_path):
    config = make_config(SETTINGS)
    killed = run_cli(["train_qlora.py", "--config", config], env={"GLMKIT_FAULT_KILL_AT": "mid_step:6"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(["train_qlora.py", "--config", config, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name, fields in (("training_log.jsonl", ("loss", "mtp_loss", "grad_norm")),
                         ("eval_log.jsonl", ("val_loss", "val/mtp_loss", "val/mtp_acceptance"))):
        want = {r["step"]: [r[f] for f in fields] for r in records(mtp_run.out, name)}
        got = {r["step"]: [r[f] for f in fields] for r in records(str(tmp_path / "run"), name)}
        assert got == want, name
    a = load_file(os.path.join(mtp_run.out, f"final-checkpoint-{STEPS}", "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / f"final-checkpoint-{STEPS}" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".mtp_block." in k for k in a)


# ---------------------------------------------------------------------------
# Outputs: the merge into layer N, generate(use_mtp=True), the serving export
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_merge_folds_the_mtp_lora_into_layer_n_and_generate_with_mtp_matches_greedy(mtp_run, tiny_model_dir,
                                                                                     tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_layers import MtpModel

    adapter = os.path.join(mtp_run.out, f"final-checkpoint-{STEPS}")
    merged = tmp_path / "merged"
    result = run_cli(["use_adapter.py", "--config", mtp_run.config, "--adapter", adapter, "--merge", str(merged),
                      "--dtype", "float32"])
    assert result.returncode == 0, result.stderr[-2000:]
    # layer N's q_proj is the base's plus the adapter's scale * B @ A, in the Hub's layout
    lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    a = lora["base_model.model.layers.0.mtp_block.self_attn.q_proj.lora_A.weight"]
    b = lora["base_model.model.layers.0.mtp_block.self_attn.q_proj.lora_B.weight"]
    key = f"model.layers.{MTP_LAYER}.self_attn.q_proj.weight"

    def tensor(folder):
        index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
        return load_file(os.path.join(folder, index[key]))[key].float()

    delta = tensor(merged) - tensor(tiny_model_dir)
    assert delta.abs().max() > 0 and torch.allclose(delta, 2.0 * (b @ a), atol=1e-6)
    # transformers loads the merged model with its MTP layer, which holds the merged weights
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{MTP_LAYER}\..*"]  # see the loss test
    assert torch.equal(MtpModel.from_pretrained(model).layers[0].mtp_block.self_attn.q_proj.weight, tensor(merged))
    ids = tokenizer("def load(path):\n    with open(path) as fh:", return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=24, do_sample=False)
    speculative = model.generate(ids, max_new_tokens=24, do_sample=False, use_mtp=True)
    assert speculative.tolist() == greedy.tolist()


@pytest.mark.trains
def test_serving_export_leaves_the_mtp_lora_out_and_names_the_merge(mtp_run, tmp_path):
    adapter = os.path.join(mtp_run.out, f"final-checkpoint-{STEPS}")
    out = tmp_path / "served"
    result = run_cli(["use_adapter.py", "--config", mtp_run.config, "--adapter", adapter, "--export-serving", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MTP-layer LoRA is not in the export" in result.stdout
    served = load_file(str(out / "adapter_model.safetensors"))
    assert served and not any("mtp_block" in k or k.startswith("base_model.model.layers.") for k in served)
    trunk = {k: v for k, v in load_file(os.path.join(adapter, "adapter_model.safetensors")).items()
             if k.startswith("base_model.model.model.")}
    assert served.keys() == trunk.keys() and all(torch.equal(served[k], trunk[k]) for k in trunk)
    readme = (out / "README.md").read_text()
    assert "apply this LoRA to the main\nmodel only, never to the draft layer" in readme
    assert f"--adapter {adapter} --merge MERGED_DIR" in readme and "--speculative-config.method mtp" in readme


# ---------------------------------------------------------------------------
# A model folder whose config and weights disagree: one line, exit 2, wherever it is used
# ---------------------------------------------------------------------------

@pytest.mark.trains
def test_config_and_weights_that_disagree_are_one_line_in_the_trainer_verify_and_merge(
        mtp_run, make_config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from glmkit.hub.verify import verify_model_dir
    from glmkit.model.adapter import MergeError, merge

    # What transformers' save_pretrained writes: config.json still announces the layer, the weights lack it.
    lacking = tmp_path / "saved-by-transformers"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(lacking)
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer.json"), lacking)
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer_config.json"), lacking)
    assert json.load(open(lacking / "config.json"))["num_nextn_predict_layers"] == 1
    line = one_line_error(run_cli(["train_qlora.py", "--config", make_config({"paths.model_dir": str(lacking)})]))
    assert line == (f"error: {lacking}/config.json announces 1 MTP layer(s) (num_nextn_predict_layers: 1) but the "
                    f"weights hold none (no model.layers.3.*, as when a model is saved by transformers' "
                    f"save_pretrained, which drops it): set num_nextn_predict_layers to 0 in config.json (no MTP "
                    f"speculative decoding, no acceptance to measure), or download the original checkpoint")
    assert any("announces 1 MTP layer(s)" in p for p in verify_model_dir(str(lacking)))
    with pytest.raises(MergeError, match="announces 1 MTP layer"):
        merge(str(lacking), os.path.join(mtp_run.out, f"final-checkpoint-{STEPS}"), str(tmp_path / "m1"))
    # The reverse: the weights hold the layer, config.json says there is none.
    hidden = tmp_path / "unannounced"
    shutil.copytree(tiny_model_dir, hidden)
    config = json.load(open(hidden / "config.json"))
    (hidden / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    problems = verify_model_dir(str(hidden))
    assert problems == [f"{hidden}/config.json: announces no MTP layer (num_nextn_predict_layers: 0) but the weights "
                        f"hold model.layers.3.*: set num_nextn_predict_layers to 1 in config.json to use it"]
    result = run_cli(["use_adapter.py", "--config", mtp_run.config, "--merge", str(tmp_path / "m2"),
                      "--set", f"paths.model_dir={hidden}"])
    assert "announces no MTP layer" in one_line_error(result)
    assert not os.path.exists(tmp_path / "m1") and not os.path.exists(tmp_path / "m2")


@pytest.mark.trains
def test_mtp_keys_are_checked_at_load_and_reach_the_trackers(mtp_run, make_config):
    from glmkit.config.load import load_config
    from glmkit.config.schema import ConfigError
    from glmkit.run.trackers import metrics

    with pytest.raises(ConfigError) as refused:
        load_config(make_config({"mtp.grad_to_trunk": True}), ["mtp.loss_weight=0"])
    assert refused.value.problems == [
        "mtp.loss_weight: must be in (0, 10], got 0.0",
        "mtp.grad_to_trunk: needs mtp.train: true (without it there is no MTP loss to send to the trunk); set "
        "mtp.train: true or mtp.grad_to_trunk: false"]
    record = records(mtp_run.out, "eval_log.jsonl")[-1]
    sent = metrics("eval", record)
    assert sent["eval/val/mtp_acceptance"] == record["val/mtp_acceptance"]
    assert sent["eval/val/mtp_loss"] == record["val/mtp_loss"]
    assert metrics("train", records(mtp_run.out, "training_log.jsonl")[-1])["train/mtp_loss"] > 0
