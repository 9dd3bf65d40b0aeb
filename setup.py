from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

setup(
    name="beitv2-hf",
    version="0.1.0",
    description="BEiT v2 (VQ-KD tokenizer + masked image modeling) and BEiT v1 for the Hugging Face stack",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["modeling_beitv2", "processing"],
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=4.0",
        "evaluate>=0.4",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "numpy>=1.24",
        "pillow>=10.0",
        "pyyaml>=6.0",
        "tqdm>=4.0",
        # StatefulDataLoader: exact resume of the loader, workers included
        "torchdata>=0.9",
    ],
    extras_require={
        "dev": [
            "mypy>=1.10",
            "parameterized>=0.9",
            "pytest>=8",
            "pytest-timeout>=2.1",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "types-PyYAML",
        ],
        "deepspeed": ["deepspeed>=0.15"],
        "tensorboard": ["tensorboard>=2.10"],
        # The demo's and the visualisation scripts' figures (examples/plots.py, visualize_mim.py).
        "plots": ["matplotlib>=3.7"],
    },
)
