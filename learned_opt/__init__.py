"""lopt: learned optimizers on JAX, usable as optax transforms."""
from learned_opt.base import LearnedLR, LearnedOptimizer
from learned_opt.features import FeatureSpec
from learned_opt.hierarchical import HierarchicalLOpt
from learned_opt.lstm_lopt import PerParamLSTM
from learned_opt.mlp_lopt import PerParamMLP
from learned_opt.optax_adapter import to_optax

__version__ = "0.1.0"
