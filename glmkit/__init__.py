"""The GLM QLoRA training kit. Importing it first silences the third-party messages that ask nothing of the user
(glmkit/run/noise.py), matched one by one by their exact text."""

from glmkit.run.noise import silence_known_noise

silence_known_noise()
