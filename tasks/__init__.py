"""Inner tasks and task families (installed as `learned_opt.tasks`).

A `TaskFamily` samples task configs (array pytrees that vmap); `family.task(cfg)` gives
a `Task` with `init`, `loss`, `batch` (drawn inside jit) and `normalize`. Families are
registered by name for meta-training (`META_TRAIN_FAMILIES`, offline data) apart from
the held-out evaluation suite (`HELDOUT_SUITE`).
"""
from learned_opt.tasks.base import NORMALIZED_LOSS_CAP, Task, TaskFamily, normalize_loss
from learned_opt.tasks.datasets import (DatasetError, DatasetNotFoundError, ImageData, TextData,
                                        image_dataset, load_idx_images, load_text_file, read_idx,
                                        synthetic_images, synthetic_text, text_dataset)
from learned_opt.tasks.image import (ConvNetFamily, ImageClassificationFamily,
                                     LogisticRegressionFamily, MLPImageFamily)
from learned_opt.tasks.language import CharLSTMFamily, LanguageModelFamily, TransformerLMFamily
from learned_opt.tasks.quadratic import QuadraticCfg, QuadraticFamily
from learned_opt.tasks.registry import (HELDOUT_SUITE, META_TRAIN_FAMILIES, META_TRAIN_HORIZON,
                                        REAL_DATA_FAMILIES, FamilySpec, SuiteTask, family_names,
                                        get_family, get_suite_task)
from learned_opt.tasks.training import TrainResult, evaluate, scan_steps, train
