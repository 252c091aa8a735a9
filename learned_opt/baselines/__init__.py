"""Hand-designed baselines: Adam and Muon from optax, SafeRate around any direction."""
from learned_opt.baselines.saferate import (SafeRateInfo, SafeRateState, adam_direction, saferate,
                                            saferate_adam, saferate_muon, saferate_step,
                                            step_from_bound)
