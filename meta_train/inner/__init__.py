"""Running an optimizer on a task: the shared inner step, training, learning-rate tuning,
the vmapped evaluation grid, and the unroll engine of meta-training."""
