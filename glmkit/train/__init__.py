"""One training run's parts: step, loss, optimizer, evaluation, loop state, checkpoints, processes."""
