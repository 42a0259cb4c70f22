"""The vision -> language projector of a LLaVA-style model.

``mlp2x_gelu``: Linear(in -> out, bias), exact (erf) GELU, Linear(out -> out, bias), the original
``mm_projector`` = ``nn.Sequential(Linear, GELU(), Linear)``. ``linear``: one Linear with bias.
"""
from __future__ import annotations

import jax
from flax import nnx

from wings_jax.model.layers import Linear, gelu_exact
from wings_jax.model.runtime import Runtime

PROJECTOR_KINDS = ("mlp2x_gelu", "linear")


class Projector(nnx.Module):
    """Maps vision features (..., in_features) to language-model embeddings (..., out_features)."""

    def __init__(self, kind: str, in_features: int, out_features: int, rt: Runtime, *, rngs: nnx.Rngs):
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector kind {kind!r}; choose one of {', '.join(PROJECTOR_KINDS)}")
        self.kind = kind
        kw = dict(use_bias=True, dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        if kind == "linear":
            self.fc1 = Linear(in_features, out_features, ("vision_embed", "embed"), **kw)
            self.fc2 = None
        else:
            self.fc1 = Linear(in_features, out_features, ("vision_embed", "mlp"), **kw)
            self.fc2 = Linear(out_features, out_features, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.fc1(x)
        if self.fc2 is not None:
            y = self.fc2(gelu_exact(y))
        return y
