"""The base model's files: download from the Hugging Face Hub, and checks that a model folder is whole."""
