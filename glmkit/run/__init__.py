"""A run folder's layout: checkpoint names, the JSON-lines logs, the trainer lock, experiment trackers."""
