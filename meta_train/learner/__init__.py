"""The learner side of meta-training: the outer optax update, the run's key schedule, and
the trainer interface with its in-process implementation."""
