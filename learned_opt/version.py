"""The version of lopt (its own module: the checkpoint header records it)."""
__version__ = "0.1.0"
