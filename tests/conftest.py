"""Test-wide settings: exact float32 matmuls on CPU, and a fixed number of host devices."""
import os
import tempfile

from jax_env import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Tests compile the same programs many times (and in subprocesses): share a compilation cache.
_CACHE = os.path.join(tempfile.gettempdir(), "wings_jax_test_jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
