"""The model: streaming 4-bit load, attention kernels, LoRA (experts included), and using an adapter."""
