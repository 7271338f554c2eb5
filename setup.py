"""salt_megatron: SALT pretraining (small LM helps a large LM) on megatron-core and DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="salt_megatron",
    version="0.1.0",
    description="SALT: efficient LLM pretraining with a small-LM teacher (KD + data selection) on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["salt_megatron", "salt_megatron.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.20",
        "numpy",
        "sentencepiece",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "tools": ["tqdm", "pyyaml", "matplotlib", "tensorboard"],
    },
    entry_points={"console_scripts": ["salt-megatron=salt_megatron.cli:main"]},
)
