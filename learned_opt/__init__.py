"""lopt: learned optimizers on JAX, usable as optax transforms."""
__version__ = "0.1.0"

from learned_opt.base import LearnedLR, LearnedOptimizer
from learned_opt.checkpoint import (CheckpointError, list_pretrained, load, load_pretrained,
                                    pretrained_path, read_header, save)
from learned_opt.features import FeatureSpec
from learned_opt.hierarchical import HierarchicalLOpt
from learned_opt.lstm_lopt import PerParamLSTM
from learned_opt.mlp_lopt import PerParamMLP
from learned_opt.optax_adapter import to_optax
