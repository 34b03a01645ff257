"""Launch strategies: the Accelerate configs the kit ships (`distributed.accelerate_config` by short name), and
which strategy (ddp | fsdp) a config asks for."""

from __future__ import annotations

import os
from typing import Optional

from glmkit.config.schema import KIT_ROOT, Config

# Shipped Accelerate configs that `distributed.accelerate_config` may name by short name.
ACCELERATE_CONFIGS = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml"}
# Offered once, never made to work with the 4-bit experts: refused at load, pointing at fsdp.
REMOVED_STRATEGIES = {"deepspeed_zero3": "DEEPSPEED"}


def accelerate_config_path(cfg: Config) -> Optional[str]:
    """The Accelerate config file to launch with (None: DDP with accelerate's defaults)."""
    acc = cfg.distributed.accelerate_config
    if acc in ACCELERATE_CONFIGS:
        return os.path.join(KIT_ROOT, "configs", "accelerate", ACCELERATE_CONFIGS[acc])
    return acc


def strategy(cfg: Config) -> str:
    """ddp | fsdp: the short name, or ddp for an Accelerate config file (validation refuses FSDP / DeepSpeed ones)."""
    acc = cfg.distributed.accelerate_config
    if acc is None or acc in ACCELERATE_CONFIGS:
        return acc or "ddp"
    return "ddp"
