"""wings_jax: Wings (multimodal LLM without text-only forgetting) in JAX / Flax NNX.

Entry points: ``python -m wings_jax.train``, ``python -m wings_jax.convert``, ``python -m wings_jax.generate``,
``python -m wings_jax.evaluate``, ``python -m wings_jax.lm_eval``, ``python -m wings_jax.lmms_eval``,
``python -m wings_jax.data.prepare``, ``python -m wings_jax.experiments.forgetting``. See README.md and
docs/architecture.md (the module map).
"""

__version__ = "0.1.0"
