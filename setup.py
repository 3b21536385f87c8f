"""lmsi_jax: Large Language Models Can Self-Improve, in JAX."""
from setuptools import find_packages, setup

setup(
    name="lmsi_jax",
    version="0.1.0",
    description="JAX/TPU-native LMSI: self-consistency pseudo-labels, mixed formats, fine-tuning rounds.",
    packages=find_packages(include=["lmsi_jax", "lmsi_jax.*"]),
    # The few-shot prompts (lmsi_jax/prompts/), read at run time: a non-editable install needs them.
    package_data={"lmsi_jax": ["prompts/*.txt", "prompts/*.md"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "seqio>=0.0.20",
        "tensorflow>=2.21.0",
        "tensorflow-text>=2.21.1",
        "tensorflow-datasets>=4.9.10",
        "ml-collections>=1.1.0",
        "numpy>=2.0",
        "tokenizers>=0.23",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "gguf>=0.10",
        "qwix>=0.1.8",          # LoRA adapters (lmsi_jax/lora.py)
        "tqdm",
        "matplotlib",
        "tensorboardX",
        "absl-py",
    ],
    extras_require={
        "test": [
            "pytest",
            "hypothesis",
            "math-verify",
            "torch==2.13.0",
            "transformers",
            "accelerate",
            "peft",             # tests/test_lora.py: PEFT adapter round trip
            "nbclient",
            "nbformat",
            "ipykernel",
            "lm-eval",      # lmsi_jax.lm_eval_model (optional at run time)
            "wandb",        # config.logging.wandb (optional at run time)
        ],
    },
)
