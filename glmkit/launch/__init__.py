"""What launch_training.sh asks of Python: shell values from the YAML, and accelerate's exit status."""
