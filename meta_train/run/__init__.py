"""A meta-training run: configs (YAML -> frozen dataclasses), the run loop, atomic run
checkpoints, metrics, plots and shipping a checkpoint."""
