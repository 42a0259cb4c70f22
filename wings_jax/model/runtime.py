"""How every model of the package computes (the language model, the vision tower, the projector, the
learners), independent of its weights: precision, attention kernel, rematerialisation, layer scan."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from wings_jax.model import attention as attention_lib

# The dtype names a config may use. JAX takes these names wherever it takes a dtype, so modules pass
# ``Runtime.dtype`` / ``Runtime.param_dtype`` on as they are.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The textual learner's decode cache (finetune stage): "full" keeps its keys and values per head and slot
# (layers x 2 x hidden per slot); "low_rank" keeps only F A_k | F A_v per layer (layers x 2 rank per slot) and the
# embeddings F once, and rebuilds keys and values over the filled slots at every step.
TEXT_CACHES = ("full", "low_rank")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Field names are config keys (``model.runtime.dtype`` etc.); keep them stable."""

    dtype: str = "float32"  # compute dtype: every matmul, activation and decode cache
    param_dtype: str = "float32"  # storage dtype of parameters (master weights)
    attention: str = "xla"  # "xla" (chunked, linear memory), "cudnn" or "dot_product" (jax.nn.dot_product_attention)
    remat: str = "none"  # per-layer policy, see layers.REMAT_POLICIES
    scan_layers: bool = True
    q_chunk: int = 512  # query chunk of the "xla" attention
    # "padded": batches hold one sequence per row, right-padded: the cudnn / dot_product attentions take their
    # masks as structure (no (L, L) mask). "packed": rows may hold several (a dense mask). Training derives it
    # from data.packing; see model.attention.
    rows: str = "packed"
    text_cache: str = "full"  # one of TEXT_CACHES; "full" decodes faster (README, bench/learner_cache.py)

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"runtime.{name}={getattr(self, name)!r}; choose one of {sorted(DTYPES)}")
        if self.attention not in attention_lib.IMPLEMENTATIONS:
            raise ValueError(f"runtime.attention={self.attention!r}; choose one of {attention_lib.IMPLEMENTATIONS}")
        if self.rows not in attention_lib.ROWS:
            raise ValueError(f"runtime.rows={self.rows!r}; choose one of {attention_lib.ROWS}")
        if self.text_cache not in TEXT_CACHES:
            raise ValueError(f"runtime.text_cache={self.text_cache!r}; choose one of {TEXT_CACHES}")
