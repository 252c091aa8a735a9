"""lopt: learned-optimizer meta-training on JAX.

The repository's top-level folders form one import namespace when installed:
`learned_opt` (public API), `learned_opt.tasks` (from tasks/), `learned_opt.meta_train`
(from meta_train/); checkpoints/ and configs/ ship as package data. `tasks`,
`checkpoints` and `configs` are other projects' names on PyPI, so we never install them
as top-level imports.
"""
from setuptools import setup

_RAY = ["ray>=2.40"]
_TFDS = ["tensorflow-datasets>=4.9.4", "array_record>=0.5"]
_PLOT = ["matplotlib>=3.7"]

setup(
    name="lopt",
    version="0.1.0",
    description="Learned-optimizer meta-training framework on JAX",
    python_requires=">=3.10",
    packages=[
        "learned_opt",
        "learned_opt.baselines",
        "learned_opt.bounds",
        "learned_opt.fused",
        "learned_opt.tasks",
        "learned_opt.meta_train",
        "learned_opt.meta_train.cli",
        "learned_opt.meta_train.distributed",
        "learned_opt.meta_train.estimators",
        "learned_opt.meta_train.eval",
        "learned_opt.meta_train.inner",
        "learned_opt.meta_train.learner",
        "learned_opt.meta_train.run",
        "learned_opt.checkpoints",
        "learned_opt.configs",
    ],
    package_dir={
        "learned_opt": "learned_opt",
        "learned_opt.tasks": "tasks",
        "learned_opt.meta_train": "meta_train",
        "learned_opt.checkpoints": "checkpoints",
        "learned_opt.configs": "configs",
    },
    package_data={
        "learned_opt.checkpoints": ["*.lopt", "*.json", "*.md"],
        "learned_opt.configs": ["*.yaml"],
    },
    # The core is what an optax user loading a pretrained optimizer needs, plus the small
    # pure-Python pieces of the `lopt` command (YAML configs, a progress bar; flax already
    # requires PyYAML). Ray, tensorflow-datasets and matplotlib are extras.
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "numpy>=1.26",
        "msgpack>=1.0",
        "pyyaml>=6",
        "tqdm>=4.60",
    ],
    extras_require={
        "ray": _RAY,
        "tfds": _TFDS,
        "plot": _PLOT,
        "all": _RAY + _TFDS + _PLOT,
        "dev": _RAY + _TFDS + _PLOT + ["pytest>=8", "pytest-xdist>=3.5"],
    },
    entry_points={"console_scripts": ["lopt=learned_opt.meta_train.cli:main"]},
)
