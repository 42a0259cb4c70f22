"""Next-token cross-entropy over the labelled positions: a fused, chunked LM head + softmax.

The vocabulary projection of a whole batch (B x L x 151936 in float32) would dominate memory, so
logits exist one chunk of positions at a time. The chunk computes its gradients right there
(``dlogits = weight * (softmax - onehot)``, then ``dhidden`` and ``dkernel``), so the backward is a
scale of saved results: the LM head runs once per chunk, never recomputed, and no logits are kept.

Answers are often a small part of a row (a 729-token image, a prompt, a short reply), so the loss can
project only the labelled positions: each row's are gathered into a fixed number of slots first.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from wings_jax.data.constants import IGNORE_ID
from wings_jax.sharding import constrain


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
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int = 512, *,
    positions: int = 0, logits_dtype: Any = jnp.float32,
) -> jax.Array:
    """Sum over positions of ``weights * -log softmax(hidden @ kernel)[target]`` (float32).

    ``hidden`` (B, L, H) and ``kernel`` (H, vocab) are in the compute dtype. ``positions`` > 0 projects
    only the weighted (labelled) positions, gathered per row into that many slots; a batch with a row
    that has more runs every position instead (the same value, the full cost). ``logits_dtype`` is what
    a chunk's logits are stored in (bfloat16 halves their memory and traffic); the matmul, the
    log-sum-exp and the softmax gradient accumulate in float32 either way.
    """
    length = hidden.shape[1]
    if not 0 <= positions <= length:
        raise ValueError(f"loss positions {positions} outside 0..{length} (the sequence length)")
    if not positions or positions == length:
        return _fused(_chunk(chunk, length), logits_dtype, hidden, kernel, targets, weights)
    labelled = weights != 0
    # a stable sort of "unlabelled" puts each row's labelled positions first, in order
    order = jnp.argsort(~labelled, axis=1, stable=True)[:, :positions]
    gather = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    return jax.lax.cond(
        jnp.all(jnp.sum(labelled, axis=1) <= positions),
        lambda: _fused(_chunk(chunk, positions), logits_dtype, gather(hidden), kernel, gather(targets),
                       gather(weights)),
        lambda: _fused(_chunk(chunk, length), logits_dtype, hidden, kernel, targets, weights),
    )


def _chunk(chunk: int, length: int) -> int:
    chunk = min(chunk, length)
    if length % chunk:
        raise ValueError(f"{length} positions are not a multiple of the loss chunk {chunk}")
    return chunk


def _split(a: jax.Array, chunk: int) -> jax.Array:  # (B, L, ...) -> (n, B, chunk, ...)
    return jnp.moveaxis(a.reshape(a.shape[0], a.shape[1] // chunk, chunk, *a.shape[2:]), 1, 0)


def _merge(a: jax.Array) -> jax.Array:  # inverse of _split
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(chunk, logits_dtype, hidden, kernel, targets, weights):
    return _scan(chunk, logits_dtype, hidden, kernel, targets, weights, False, False)[0]


def _scan(chunk, logits_dtype, hidden, kernel, targets, weights, want_hidden, want_kernel):
    """The loss, and the gradients asked for (of the loss itself, i.e. for a cotangent of 1)."""

    def one(d_kernel, xs):
        hid, tgt, wgt = xs
        logits = jnp.einsum("bch,hv->bcv", hid, kernel, preferred_element_type=jnp.float32).astype(logits_dtype)
        logits = constrain(logits, ("act_batch", "act_length", "act_vocab")).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        loss = jnp.sum((lse - picked) * wgt)
        d_hid = None
        if want_hidden or want_kernel:
            d_logits = jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(tgt, logits.shape[-1], dtype=jnp.float32)
            d_logits = (d_logits * wgt[..., None]).astype(hid.dtype)
            if want_hidden:
                d_hid = jnp.einsum("bcv,hv->bch", d_logits, kernel)
            if want_kernel:
                d_kernel = d_kernel + jnp.einsum("bch,bcv->hv", hid, d_logits, preferred_element_type=jnp.float32)
        return d_kernel, (loss, d_hid)

    zeros = jnp.zeros(kernel.shape, jnp.float32) if want_kernel else None
    d_kernel, (losses, d_hidden) = jax.lax.scan(
        one, zeros, (_split(hidden, chunk), _split(targets, chunk), _split(weights, chunk)))
    return jnp.sum(losses), (None if d_hidden is None else _merge(d_hidden)), d_kernel


def _fused_forward(chunk, logits_dtype, hidden, kernel, targets, weights):
    # symbolic_zeros: ``perturbed`` says which inputs are differentiated, so a frozen LM head (stage 1)
    # costs no kernel gradient.
    total, d_hidden, d_kernel = _scan(chunk, logits_dtype, hidden.value, kernel.value, targets.value, weights.value,
                                      hidden.perturbed, kernel.perturbed)
    return total, (d_hidden, d_kernel)


def _fused_backward(chunk, logits_dtype, residuals, g):
    d_hidden, d_kernel = residuals
    scale = lambda d: None if d is None else (g * d).astype(d.dtype)  # noqa: E731
    return scale(d_hidden), scale(d_kernel), None, None


_fused.defvjp(_fused_forward, _fused_backward, symbolic_zeros=True)
