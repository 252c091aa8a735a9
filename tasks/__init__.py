"""Inner tasks and task families (installed as `learned_opt.tasks`)."""
from learned_opt.tasks.base import NORMALIZED_LOSS_CAP, Task, TaskFamily, normalize_loss
from learned_opt.tasks.quadratic import QuadraticCfg, QuadraticFamily
