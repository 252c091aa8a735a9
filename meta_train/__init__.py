"""Meta-training: unrolls, gradient estimators, outer loop (installed as `learned_opt.meta_train`)."""
