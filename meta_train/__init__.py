"""Meta-training (installed as `learned_opt.meta_train`), grouped by concern:

* `inner/`: running an optimizer on a task (the one inner step; train, tune, the
  evaluation grid) and the unroll engine;
* `estimators/`: antithetic truncated ES and PES over truncated unrolls, truncation
  schedules;
* `learner/`: the outer update, the run's key schedule and the trainer interface
  (`MetaTrainer` in-process);
* `distributed/`: the Ray worker pool (`RayMetaTrainer`), the only part that imports ray;
* `run/`: configs, the run loop, run checkpoints, metrics, plots, shipping;
* `eval/`: held-out evaluation against tuned baselines, and reports;
* `cli/`: the `lopt` command.
"""
from learned_opt.meta_train.estimators.base import (GradEstimate, GradientEstimator,
                                                    combine_estimates)
from learned_opt.meta_train.estimators.pes import PES, PESState
from learned_opt.meta_train.estimators.truncated_es import TruncatedES, TruncatedESState
from learned_opt.meta_train.estimators.truncation import (ConstantTruncation,
                                                          LogUniformTruncation,
                                                          TruncationSchedule)
from learned_opt.meta_train.inner.loop import (TrainResult, evaluate, inner_step, run_grid,
                                               scan_steps, train)
from learned_opt.meta_train.inner.tuning import DEFAULT_GRID, TuningResult, tune_learning_rate
from learned_opt.meta_train.inner.unroll import InnerState, map_population, unroll_member
from learned_opt.meta_train.learner.outer import (LearnerState, apply_estimate, estimate_key,
                                                  init_learner, make_outer_optimizer, run_keys)
from learned_opt.meta_train.learner.trainer import MetaTrainer, Trainer
from learned_opt.meta_train.run.config import (MetaTrainConfig, build_estimators, build_lopt,
                                               build_outer_optimizer, config_from_dict,
                                               load_config)
from learned_opt.meta_train.run.runner import RunResult, run_meta_training
