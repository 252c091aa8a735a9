"""lopt: learned-optimizer meta-training on JAX.

The repository's top-level folders form one import namespace when installed:
`learned_opt` (public API), `learned_opt.tasks` (from tasks/), `learned_opt.meta_train`
(from meta_train/); checkpoints/ and configs/ ship as package data. `tasks`,
`checkpoints` and `configs` are other projects' names on PyPI, so we never install them
as top-level imports.
"""
from setuptools import setup

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
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9.4",
        "array_record>=0.5",
        "ray>=2.40",
        "pyyaml>=6",
        "msgpack>=1.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["lopt=learned_opt.meta_train.cli:main"]},
)
