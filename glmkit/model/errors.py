"""The model package's errors, apart from the modules that raise them so loading and LoRA need not import each other."""


class ModelLoadError(RuntimeError):
    """The checkpoint can't be used as it is; the message says what to do."""


class LoraTargetError(ModelLoadError):
    """A configured LoRA target that matches nothing (or the wrong kind of thing) in the model."""
