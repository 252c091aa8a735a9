"""Inner tasks and task families (installed as `learned_opt.tasks`).

A `TaskFamily` samples task configs (array pytrees that vmap); `family.task(cfg)` gives
a `Task` with `init`, `loss`, `batch` (drawn inside jit) and `normalize`. Families are
registered by name for meta-training (`META_TRAIN_FAMILIES`, offline data) apart from
the held-out evaluation suites (`suites.py`). Tasks hold no optimizer code: training a
task with an optimizer is `learned_opt.meta_train.train`.
"""
from learned_opt.tasks.base import NORMALIZED_LOSS_CAP, Task, TaskFamily, normalize_loss
from learned_opt.tasks.datasets import (DatasetError, DatasetNotFoundError, ImageData, TextData,
                                        image_dataset, load_idx_images, load_text_file, read_idx,
                                        synthetic_images, synthetic_text, text_dataset)
from learned_opt.tasks.image import (ConvNetFamily, ImageClassificationFamily,
                                     LogisticRegressionFamily, MLPImageFamily)
from learned_opt.tasks.language import CharLSTMFamily, LanguageModelFamily, TransformerLMFamily
from learned_opt.tasks.quadratic import QuadraticCfg, QuadraticFamily
from learned_opt.tasks.registry import (META_TRAIN_FAMILIES, META_TRAIN_HORIZON,
                                        REAL_DATA_FAMILIES, FamilySpec, family_names, get_family)
from learned_opt.tasks.suites import (HELDOUT_SUITE, SUITES, SuiteTask, get_suite,
                                      get_suite_task)
