"""Test-wide settings: exact float32 matmuls on CPU, and a fixed number of host devices."""
import os
import tempfile

from jax_env import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Tests compile the same programs many times (and in subprocesses): share a compilation cache.
_CACHE = os.path.join(tempfile.gettempdir(), "wings_jax_test_jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Past this many memory maps the compiled programs are dropped (see _release_compiled_programs)
_MAPS_BEFORE_RELEASE = 30_000


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Drops every compiled program once the process holds many memory maps (the persistent cache above
    reloads what a later test needs). XLA's CPU backend maps its JIT code into memory regions per kernel (~2,300
    for one decode block of an unrolled 8-layer model); a session that keeps every test's programs alive passes
    the kernel's limit (vm.max_map_count, 65,530 here) and crashes inside the next compile."""
    yield
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as maps:
            if sum(1 for _ in maps) > _MAPS_BEFORE_RELEASE:
                jax.clear_caches()
