"""What the console and the training records say about time and memory: the bar, the clock, GPU memory."""

from __future__ import annotations

import time

import torch

_open_bars = []


def progress_bar(accelerator, step: int, total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not accelerator.is_main_process, desc="train", unit="step",
               dynamic_ncols=True)
    _open_bars.append(bar)
    return bar


def eval_bar(accelerator, step: int, total: int):
    """A bar for one eval (this process's micro-batches over every set), gone from the console when it ends."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not accelerator.is_main_process, desc="eval", unit="batch", leave=False,
               dynamic_ncols=True, postfix={"step": step})
    _open_bars.append(bar)
    return _Closing(bar)


class _Closing:
    """`with eval_bar(...) as bar:` closes the bar (and forgets it) however the block ends."""

    def __init__(self, bar):
        self.bar = bar

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()
        if self.bar in _open_bars:
            _open_bars.remove(self.bar)
        return False


def console(accelerator, line: str) -> None:
    """One line on the main process's console, printed above any progress bar instead of through it."""
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(line)


def close_progress_bars() -> None:
    """Finish the bar before an error is printed, so the error is the console's last line."""
    while _open_bars:
        _open_bars.pop().close()


class StepClock:
    """Wall time per step, smoothed for the ETA; elapsed time carries over a resume."""

    def __init__(self, elapsed_before: float = 0.0):
        self.base = elapsed_before
        self.start = self.last = time.time()
        self.step_seconds = None
        self.ema = None

    def tick(self) -> float:
        now = time.time()
        self.step_seconds = now - self.last
        self.ema = self.step_seconds if self.ema is None else 0.9 * self.ema + 0.1 * self.step_seconds
        self.last = now
        return self.elapsed()

    def exclude_side_work(self) -> None:
        """Start the next step's interval now, so eval and checkpoint time don't count as step time."""
        self.last = time.time()

    def elapsed(self) -> float:
        return self.base + time.time() - self.start

    def rates(self, tokens: int, step: int, total: int) -> dict:
        seconds = max(self.step_seconds or 0.0, 1e-9)
        return {"tokens_per_sec": tokens / seconds, "steps_per_sec": 1.0 / max(self.ema, 1e-9),
                "eta_seconds": (total - step) * self.ema}


def gpu_memory(peak_only: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {}
    if peak_only:
        return {"gpu_mem_peak": torch.cuda.max_memory_allocated()}
    return {"gpu_mem_allocated": torch.cuda.memory_allocated(), "gpu_mem_reserved": torch.cuda.memory_reserved(),
            "gpu_mem_peak": torch.cuda.max_memory_allocated()}
