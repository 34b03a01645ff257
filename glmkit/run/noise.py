"""Third-party messages that read like errors but ask nothing of the user, silenced one by one.

Each is matched by its exact text at the place it is raised (the warning's module, the logger's name), so a new
or different message from the same library still shows. Installed when `glmkit` is first imported, before any of
these libraries is, so every command, test and benchmark is quiet the same way, on CPU and GPU alike.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, the message's start, the module the warning is attributed to): why each is harmless is beside it.
WARNINGS = [
    # peft reads model.is_gradient_checkpointing, a deprecated alias, while wrapping the model (peft 0.21,
    # transformers 5.23); nothing to change on our side.
    (FutureWarning, "`is_gradient_checkpointing` is deprecated and will be removed in v6", r"transformers\.modeling_utils"),
    # torchdata 0.11's StatefulDataLoader calls torch.set_vital, now a no-op stub in torch 2.13.
    (UserWarning, "'set_vital' is deprecated, please do not call", r"torchdata\.stateful_dataloader\.stateful_dataloader"),
]
# (logger name, the message's start): bitsandbytes 0.50 on a CPU with AVX512-BF16 looks for an optional Hub kernel
# package (`kernels`) and falls back to its own CPU code when it is missing, which is the kit's CPU path anyway.
LOG_RECORDS = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
]


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_known_noise() -> None:
    for category, start, module in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category, module=module)
    for name, start in LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
