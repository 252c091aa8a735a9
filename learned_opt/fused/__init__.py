"""Fused GPU kernels for learned optimizers (Pallas; interpret mode on CPU)."""
from learned_opt.fused.per_param import MODES, channels, per_param_updates, select
