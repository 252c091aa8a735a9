"""Held-out evaluation: optimizers resolved from names (one table of baselines), every
suite task trained on the same seeds, metrics and markdown reports."""
