"""Next-token cross-entropy over the labelled positions, computed in sequence chunks.

The vocabulary projection of a whole batch (B x L x 151936 in float32) would dominate memory, so
logits exist one chunk of positions at a time, under ``jax.checkpoint`` (recomputed in backward).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from wings_jax.data.constants import IGNORE_ID


def next_token_targets(labels: jax.Array, segments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Position t predicts ``labels[t + 1]`` when t + 1 is in the same segment and labelled.

    Returns ``(targets, weights)``, both (B, L); the last position never predicts anything.
    """
    following = labels[:, 1:]
    same_segment = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    weights = (following != IGNORE_ID) & same_segment
    targets = jnp.where(weights, following, 0)
    pad = jnp.zeros_like(labels[:, :1])
    return jnp.concatenate([targets, pad], 1), jnp.concatenate([weights, pad.astype(bool)], 1).astype(jnp.float32)


def chunked_cross_entropy(
    hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], targets: jax.Array, weights: jax.Array,
    chunk: int = 512,
) -> jax.Array:
    """Sum over positions of ``weights * -log softmax(logits_fn(hidden))[target]`` (float32)."""
    b, length, h = hidden.shape
    chunk = min(chunk, length)
    if length % chunk:
        raise ValueError(f"sequence length {length} is not a multiple of the loss chunk {chunk}")
    n = length // chunk

    def split(a):  # (B, L, ...) -> (n, B, chunk, ...)
        return jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(total, xs):
        hid, tgt, wgt = xs
        logits = logits_fn(hid).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        losses = jax.nn.logsumexp(logits, axis=-1) - picked
        return total + jnp.sum(losses * wgt), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(weights)))
    return total
