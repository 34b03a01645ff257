"""The memory plan: whether a run fits the GPUs, priced from the architecture before any weight is read."""
