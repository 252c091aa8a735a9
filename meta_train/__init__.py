"""Meta-training: unrolls, gradient estimators, outer loop (installed as `learned_opt.meta_train`)."""
from learned_opt.meta_train.config import (MetaTrainConfig, build_estimators, build_lopt,
                                           build_outer_optimizer, config_from_dict, load_config)
from learned_opt.meta_train.estimator_base import GradEstimate, GradientEstimator, combine_estimates
from learned_opt.meta_train.outer import (LearnerState, MetaTrainer, apply_estimate, estimate_key,
                                          init_learner, make_outer_optimizer)
from learned_opt.meta_train.pes import PES, PESState
from learned_opt.meta_train.runner import RunResult, run_meta_training
from learned_opt.meta_train.truncated_es import TruncatedES, TruncatedESState
from learned_opt.meta_train.truncation import (ConstantTruncation, LogUniformTruncation,
                                               TruncationSchedule)
from learned_opt.meta_train.unroll import InnerState, map_population, unroll_member
