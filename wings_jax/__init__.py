"""wings_jax: Wings (multimodal LLM without text-only forgetting) in JAX / Flax NNX.

Entry points: ``python -m wings_jax.train``, ``python -m wings_jax.convert``, ``python -m wings_jax.generate``,
``python -m wings_jax.evaluate``, ``python -m wings_jax.data.prepare``. See README.md and docs/.
"""

__version__ = "0.1.0"
