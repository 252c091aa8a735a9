"""lopt: learned optimizers on JAX, usable as optax transforms."""
__version__ = "0.1.0"
