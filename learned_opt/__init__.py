"""lopt: learned optimizers on JAX, usable as optax transforms.

`import learned_opt` loads what an optax user needs (architectures, checkpoints,
baselines, the optax adapter); tasks (`learned_opt.tasks`) and meta-training
(`learned_opt.meta_train`) load only when imported themselves.
"""
import os as _os

from learned_opt.version import __version__


def _map_source_checkout():
  """Lets a source checkout import as the installed namespace.

  Installed, setup.py maps tasks/, meta_train/, checkpoints/ and configs/ under
  `learned_opt`. A checkout on sys.path (Ray puts the driver's working directory on
  every worker's path, ahead of site-packages) finds this folder without them, so
  we add the checkout root to the package path: `learned_opt.meta_train` then
  resolves to <root>/meta_train. Installed copies have no such siblings and skip it.
  """
  here = _os.path.dirname(_os.path.abspath(__file__))
  root = _os.path.dirname(here)
  is_checkout = (_os.path.isfile(_os.path.join(root, "setup.py"))
                 and _os.path.isfile(_os.path.join(root, "meta_train", "__init__.py"))
                 and not _os.path.isdir(_os.path.join(here, "meta_train")))
  if is_checkout and root not in __path__:
    __path__.append(root)


_map_source_checkout()

from learned_opt.base import LearnedLR, LearnedOptimizer
from learned_opt.compile import compiler_options
from learned_opt.checkpoint import (CheckpointError, list_pretrained, load, load_pretrained,
                                    pretrained_path, read_header, save)
from learned_opt.features import FeatureSpec
from learned_opt.hierarchical import HierarchicalLOpt
from learned_opt.lstm_lopt import PerParamLSTM
from learned_opt.mlp_lopt import PerParamMLP
from learned_opt.normalized import NormalizedMLP
from learned_opt.normalized_optax import normalized_mlp, scale_by_normalized_mlp
from learned_opt.nominals import (AdamHDNominal, AdamNominal, Nominal, ProdigyNominal,
                                  register_nominal)
from learned_opt.optax_adapter import scale_by_learned_direction, takes_learning_rate, to_optax
from learned_opt.registry import ARCHITECTURES, get_architecture, register_architecture
