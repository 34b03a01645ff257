"""Fakes for the tests: a run that writes realistic logs without training (the dashboard tests).

Records follow the trainer's log contract (see glmkit/run/logs.py): one JSON
object per line, flushed per line, every record with `step` and `time`, in
the files glmkit.run.logs.LOG_FILES names. The fake Hub server is tests/fake_hub.py.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time

from glmkit.run.checkpoint_names import COMPLETE, META, checkpoint_path
from glmkit.run.logs import LOG_FILES

NUM_LAYERS, NUM_EXPERTS, TOP_K = 6, 16, 2


def loss_at(step: int) -> float:
    return 2.2 * math.exp(-step / 400) + 1.1 + 0.05 * math.sin(step * 0.7)


def tokens_at(step: int) -> int:
    """Non-pad input tokens of a step: a full batch is 65,536, padding takes a varying part."""
    return 65536 - 97 * (step % 13)


def tokens_seen_at(step: int) -> int:
    """What the trainer's `tokens_seen` holds after `step` (steps 1..step, logged or not)."""
    cycles, rest = divmod(step, 13)  # sum of step % 13 over 1..step, in closed form
    return 65536 * step - 97 * (78 * cycles + rest * (rest + 1) // 2)


class FakeRun:
    """Writes the five logs of one run (and checkpoints) under `output_dir`."""

    def __init__(self, output_dir: str, total_steps: int = 1000, t0: float | None = None,
                 with_tokens_seen: bool = True):
        self.output_dir = str(output_dir)
        self.with_tokens_seen = with_tokens_seen  # False: a log from before the trainer wrote tokens_seen
        self.logs_dir = os.path.join(self.output_dir, "logs")
        os.makedirs(self.logs_dir, exist_ok=True)
        self.total_steps = total_steps
        self.t0 = time.time() if t0 is None else t0
        self.clock = self.t0

    def path(self, kind: str) -> str:
        """The log of `kind`, a key of glmkit.run.logs.LOG_FILES ("train", "eval", "experts", "events", "errors")."""
        return os.path.join(self.logs_dir, LOG_FILES[kind])

    def append(self, kind: str, record: dict) -> None:
        with open(self.path(kind), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def append_raw(self, kind: str, text: str) -> None:
        with open(self.path(kind), "a", encoding="utf-8") as fh:
            fh.write(text)

    def tick(self, seconds: float = 2.0) -> float:
        self.clock += seconds
        return self.clock

    def start(self) -> None:
        self.event("run_start", 0, config={"training": {"epochs": 1}}, world_size=1, effective_batch=16,
                   tokens_per_step=65536, total_steps=self.total_steps, model_audit={"experts": NUM_EXPERTS})

    def event(self, event: str, step: int, **fields) -> None:
        self.append("events", {"step": step, "time": self.tick(0.01), "event": event, **fields})

    def train(self, step: int, loss: float | None = None, when: float | None = None) -> dict:
        now = self.tick() if when is None else when
        record = {
            "step": step, "time": now, "loss": loss_at(step) if loss is None else loss,
            "lr": 2e-4 * min(1.0, step / 50) * (0.5 + 0.5 * math.cos(math.pi * step / self.total_steps)),
            "grad_norm": 0.8 + 0.2 * math.cos(step), "epoch": step / self.total_steps, "tokens": tokens_at(step),
            "tokens_per_sec": 32768.0 + 500 * math.sin(step), "steps_per_sec": 0.5,
            "elapsed_seconds": now - self.t0, "eta_seconds": (self.total_steps - step) * 2.0,
            "total_steps": self.total_steps, "aux_loss": None,
        }
        if self.with_tokens_seen:
            record["tokens_seen"] = tokens_seen_at(step)
        self.append("train", record)
        return record

    def evaluate(self, step: int, val_loss: float | None = None) -> None:
        val_loss = loss_at(step) + 0.1 if val_loss is None else val_loss
        ppl = math.exp(val_loss)
        self.append("eval", {"step": step, "time": self.tick(0.5), "val_loss": val_loss,
                             "perplexity": ppl, "val_tokens": 40960})
        self.event("eval", step, val_loss=val_loss, perplexity=ppl)

    def evaluate_sets(self, step: int, losses: dict[str, float], select_by: str = "val",
                      acceptance: dict[str, float] | None = None) -> None:
        """An eval record as the trainer writes it since eval sets (glmkit/train/evaluation.py); `acceptance`:
        each set's MTP acceptance, as a model with an MTP layer logs it (with an MTP loss beside it)."""
        record = {"step": step, "time": self.tick(0.5), "select_by": select_by, "sets": list(losses)}
        for name, loss in losses.items():
            record.update({f"{name}/loss": loss, f"{name}/perplexity": math.exp(loss), f"{name}/tokens": 4096})
            if acceptance is not None:
                record.update({f"{name}/mtp_acceptance": acceptance[name], f"{name}/mtp_loss": loss + 1.0,
                               f"{name}/mtp_positions": 4000})
        record.update(val_loss=losses[select_by], perplexity=math.exp(losses[select_by]), val_tokens=4096)
        self.append("eval", record)
        self.event("eval", step, val_loss=losses[select_by], perplexity=math.exp(losses[select_by]), losses=losses,
                   **({"baseline": True} if step == 0 else {}))

    def experts(self, step: int, collapsed: bool = False) -> None:
        layers = []
        for layer in range(1, NUM_LAYERS + 1):
            if collapsed:
                counts = [4000 if e < 2 else 0 for e in range(NUM_EXPERTS)]
            else:
                counts = [500 + 37 * ((e * 7 + layer * 3 + step) % 11) for e in range(NUM_EXPERTS)]
            if layer == 3 and not collapsed:
                counts[5] = 0
            mean = sum(counts) / len(counts)
            total = sum(counts)
            probs = [c / total for c in counts if c]
            entropy = -sum(p * math.log(p) for p in probs) / math.log(NUM_EXPERTS)
            layers.append({"layer": layer, "counts": counts, "max_over_mean": max(counts) / mean,
                           "entropy": entropy, "dead_experts": [e for e, c in enumerate(counts) if c == 0]})
        self.append("experts", {"step": step, "time": self.tick(0.01), "interval_tokens": 65536,
                                     "num_experts": NUM_EXPERTS, "top_k": TOP_K, "layers": layers})

    def checkpoint(self, step: int, val_loss: float | None, best: bool = False) -> str:
        folder = checkpoint_path(self.output_dir, step)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as fh:
            fh.write(b"\0" * 4096)
        with open(os.path.join(folder, META), "w", encoding="utf-8") as fh:
            json.dump({"step": step, "val_loss": val_loss, "epoch": step / self.total_steps}, fh)
        open(os.path.join(folder, COMPLETE), "w").close()
        self.event("checkpoint_saved", step, path=folder, val_loss=val_loss, size_bytes=4096)
        if best:
            self.event("best_updated", step, path=os.path.join(self.output_dir, "best"), val_loss=val_loss,
                       checkpoint=folder)
        return folder

    def error(self, step: int, message: str = "CUDA out of memory") -> None:
        self.append("errors", {"step": step, "time": self.tick(0.1), "type": "OutOfMemoryError",
                              "message": message, "traceback": "Traceback ...\nOutOfMemoryError", "rank": 0})

    def steps(self, first: int, last: int, eval_every: int = 0, expert_every: int = 0) -> None:
        for step in range(first, last + 1):
            self.train(step)
            if expert_every and step % expert_every == 0:
                self.experts(step)
            if eval_every and step % eval_every == 0:
                self.evaluate(step)


def finished_run(output_dir, total_steps: int = 60) -> FakeRun:
    run = FakeRun(output_dir, total_steps=total_steps)
    run.start()
    run.steps(1, total_steps, eval_every=20, expert_every=10)
    run.checkpoint(20, loss_at(20) + 0.1)
    run.checkpoint(40, loss_at(40) + 0.1, best=True)
    run.event("run_end", total_steps, status="finished", final_checkpoint=os.path.join(output_dir, "final"))
    return run


class LiveWriter(threading.Thread):
    """Appends a training record every `interval` seconds, like a live run.

    Every `eval_every` steps it also evaluates and saves a checkpoint, and it
    logs expert usage every `expert_every` steps.
    """

    def __init__(self, run: FakeRun, first_step: int, interval: float = 0.3,
                 eval_every: int = 10, expert_every: int = 5):
        super().__init__(daemon=True)
        self.fake, self.step, self.interval = run, first_step, interval
        self.eval_every, self.expert_every = eval_every, expert_every
        self.stop_event = threading.Event()
        self.best = math.inf

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.run_step()
            self.stop_event.wait(self.interval)

    def run_step(self) -> None:
        fake = self.fake
        fake.train(self.step, when=time.time())
        if self.step % self.expert_every == 0:
            fake.experts(self.step)
        if self.step % self.eval_every == 0:
            val_loss = loss_at(self.step) + 0.1
            fake.evaluate(self.step, val_loss)
            fake.checkpoint(self.step, val_loss, best=val_loss < self.best)
            self.best = min(self.best, val_loss)
        self.step += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
