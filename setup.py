"""fastdllm: inference runtime and experiment framework for Fast-dLLM v2 block-diffusion models.

The repository folder ``kernels/`` is installed under the import name ``fastdllm_kernels``. It has no
``__init__.py``: Hugging Face publishes a distribution called ``kernels`` that transformers imports, and a regular
package of that name in the current directory would be found first (kernels/README.md).
"""
from setuptools import setup

KERNEL_PACKAGES = ["fastdllm_kernels", "fastdllm_kernels.attention", "fastdllm_kernels.rms_norm",
                   "fastdllm_kernels.rope", "fastdllm_kernels.swiglu", "fastdllm_kernels.select",
                   "fastdllm_kernels.linear"]

setup(
    name="fastdllm",
    version="0.1.0",
    description="Fast-dLLM v2 block-diffusion runtime, Triton kernels and lm-eval bridge",
    python_requires=">=3.10",
    packages=["fastdllm_rt", "fastdllm_rt.train", "evalbridge", "evalbridge.tasks"] + KERNEL_PACKAGES,
    package_dir={"fastdllm_kernels": "kernels",
                 **{p: "kernels/" + p.split(".", 1)[1] for p in KERNEL_PACKAGES[1:]}},
    package_data={"evalbridge.tasks": ["*.yaml", "data/*.jsonl"], "fastdllm_rt": ["small_model/*"],
                  "fastdllm_kernels.linear": ["tuned.json"]},
    install_requires=[
        # Tested: torch 2.13 with Triton 3.9 on CPU (CI), torch 2.11 with Triton 3.6 on H100/H200.
        "torch>=2.11",
        "triton>=3.6,<4",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "tokenizers>=0.19",
        "numpy",
    ],
    extras_require={
        # CI tests both ends of these ranges: the newest releases, then transformers 4.53 with lm_eval 0.4.12.
        "eval": ["lm_eval>=0.4.12,<0.5", "transformers>=4.53", "matplotlib"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "transformers>=4.53"],
    },
    entry_points={"console_scripts": ["fastdllm-eval=evalbridge.__main__:main"]},
)
