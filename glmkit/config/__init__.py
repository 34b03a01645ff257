"""The one typed config: `training_config.yaml` parsed into documented dataclasses and validated at load."""
