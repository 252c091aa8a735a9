"""lopt: learned optimizers on JAX, usable as optax transforms."""
from learned_opt.base import LearnedLR, LearnedOptimizer

__version__ = "0.1.0"
