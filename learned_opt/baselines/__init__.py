"""Hand-designed baselines: Adam and Muon from optax, SafeRate around any direction, and
Adam with hypergradient-adapted per-tensor learning rates.

Tuning a baseline's learning rate on a task runs training, so it lives with the code
that runs optimizers on tasks: `learned_opt.meta_train.tune_learning_rate`.
"""
from learned_opt.baselines.saferate import (SafeRateInfo, SafeRateState, adam_direction, saferate,
                                            saferate_adam, saferate_muon, saferate_step,
                                            step_from_bound)
from learned_opt.baselines.adam_muon import (adamw, decay_mask, muon, muon_dimension_numbers,
                                             muon_labels)
from learned_opt.baselines.hypergradient import ScaleByAdamHDState, adam_hd, scale_by_adam_hd
from learned_opt.baselines.scheduled import (adamw_cosine, muon_cosine, schedule_free_adamw,
                                             warmup_cosine)
