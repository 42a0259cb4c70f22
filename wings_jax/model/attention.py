"""Masked multi-head attention over compact mask descriptors, with optional shared "extra value" channels.

The mask is never passed as an (L, L) array. Each query and key carries a segment id (0 = padding
or no key) and a position; query i sees key j iff ``q_seg[i] == k_seg[j] != 0`` and, when causal,
``k_pos[j] <= q_pos[i]``. A query that sees no key gets an output of exactly 0 (never NaN).

``extra_values`` (batch, keys, C) are value channels shared by every head; the function returns
their attention-weighted sum *summed over heads* as a second output. The Wings router is exactly
that: ``sum_heads(P) @ W_r`` with ``W_r`` rows as the extra values, so the (batch, heads, L, L)
probability tensor never exists outside one query chunk.

Implementations:
- ``"xla"``: plain JAX, queries processed in equal chunks of at most ``q_chunk`` (any length; the
  last chunk padded) with a flash-style custom backward (outputs and log-sum-exp saved, one chunk's
  probabilities recomputed at a time), so memory grows linearly with length, forward and backward.
  Works on every backend.
- ``"cudnn"`` / ``"dot_product"``: ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU
  for ``"cudnn"``, XLA's choice for ``"dot_product"``). Extra channels ride along as additional
  value channels (query/key zero-padded to the same head size, the scale fixed explicitly).

How those two take the mask depends on ``rows`` and ``causal_by_index``:
- ``rows="padded"`` (one sequence per row, right padding: what inference and unpacked training feed) with
  causality by index (or none): as structure, never as an (L, L) array: ``is_causal`` (by index, which is
  by position in such rows) and
  one constant query/key channel that pushes every non-key (segment 0: padding, or the textual learner's
  image slots) ``EXCLUDED_LOGIT`` below the rest, so cuDNN runs its causal flash kernel without a bias
  (no dbias in the backward, no (L, L) memory). The channel adds exactly 0 to every real key's logit.
- otherwise (several sequences per row, or causality that is not by index): a dense (B, 1, Tq, Tk)
  boolean mask, which JAX turns into a bias (the public API takes no segment ids).
A call with a cache and causality (prefill, decode: queries at slots, not at key indices) is not causal by
index and takes the dense mask; for decode that is (B, 1, T, S) with T small: linear in the cache length.

- ``"splash"``: the TPU splash-attention Pallas kernel (``jax.experimental.pallas.ops.tpu.splash_attention``;
  interpreted off TPU, for tests). Masks as structure in every row layout: segment ids for packed rows and
  non-keys, a static causal or full block mask, so causal blocks above the diagonal are skipped. Extra
  channels ride as extra value columns (the kernel takes a value head size unlike q/k's). Calls it cannot
  express (a cache: queries at slots; causality not by index) run the ``"xla"`` path.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence, TypeVar

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from wings_jax import sharding

Implementation = Literal["xla", "cudnn", "dot_product", "splash"]
IMPLEMENTATIONS = ("xla", "cudnn", "dot_product", "splash")
Rows = Literal["packed", "padded"]
ROWS = ("packed", "padded")
ATTENTION_NAME = "attention"  # checkpoint name of attention outputs (and the xla path's log-sum-exp)
T = TypeVar("T")
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows stay NaN-free
# The exclusion channel's key value: finite in float16 and bfloat16, and times any head size's scale
# (>= 1/16 up to 256-wide heads) a logit far below every real one, so excluded keys get weight exactly 0.
_EXCLUDE_KEY = -30000.0


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array,
    k_seg: jax.Array,
    causal: bool,
    scale: float | None = None,
    extra_values: jax.Array | None = None,
    implementation: Implementation = "xla",
    q_chunk: int = 512,
    heads_first: bool = False,
    key_fill: jax.Array | None = None,
    rows: Rows = "packed",
    causal_by_index: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Attention of q (B, Tq, N, D) over k, v (B, Tk, K, D), N a multiple of K; ``heads_first``: k, v
    are (B, K, Tk, D), a decode cache's layout (what the xla path reads, so it needs no transpose).

    ``key_fill`` (a scalar): no query sees a key at index >= key_fill (a cache's unfilled slots), so only
    the shortest of :func:`prefix_lengths` that holds them is read (one branch per length, chosen at run
    time: a decode loop reads more keys as it fills the cache, never all of them from its first step).

    Two promises of the caller, which let kernels take the mask as structure (see the module docstring):
    ``rows="padded"``: one sequence per row with right padding (segment ids 0 or one value per row);
    ``causal_by_index``: the keys are the queries' own tokens, in order (no cache slots, no other ordering),
    so within a segment causality by position is causality by index. Unused when not causal.

    Returns ``(out (B, Tq, N, D), extra (B, Tq, C) or None)``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if rows not in ROWS:
        raise ValueError(f"unknown row layout {rows!r}; choose one of {ROWS}")
    key_axis = 2 if heads_first else 1
    kv_heads = k.shape[3 - key_axis]
    if q.shape[2] % kv_heads:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {kv_heads}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if key_fill is not None:
        kw = dict(q_pos=q_pos, q_seg=q_seg, causal=causal, scale=scale, implementation=implementation,
                  q_chunk=q_chunk, heads_first=heads_first, rows=rows, causal_by_index=causal_by_index)
        return on_filled_prefix(
            lambda k, v, k_pos, k_seg, extra_values: attend(q, k, v, k_pos=k_pos, k_seg=k_seg,
                                                            extra_values=extra_values, **kw),
            key_fill, (k, v, k_pos, k_seg, extra_values), (key_axis, key_axis, 1, 1, 1))
    if implementation == "xla" or (implementation == "splash" and (heads_first or (causal and not causal_by_index))):
        if not heads_first:
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        # names its outputs (and its log-sum-exp) inside its custom forward
        return _xla_chunked(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, extra_values, q_chunk)
    if implementation == "splash":
        out, extra = _splash(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, extra_values)
    else:
        if heads_first:  # jax.nn.dot_product_attention takes (B, T, heads, D)
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        out, extra = _dot_product(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, extra_values,
                                  "cudnn" if implementation == "cudnn" else None,
                                  rows == "padded" and (causal_by_index or not causal))
    return checkpoint_name(out, ATTENTION_NAME), None if extra is None else checkpoint_name(extra, ATTENTION_NAME)


def on_filled_prefix(fn: Callable[..., T], key_fill: jax.Array, arrays: Sequence[jax.Array | None],
                     axes: Sequence[int]) -> T:
    """``fn(*arrays)`` with each array cut along its key axis (``axes``; None entries stay None) to the
    shortest of :func:`prefix_lengths` that holds ``key_fill`` keys: one ``lax.switch`` branch per length."""
    lengths = prefix_lengths(arrays[0].shape[axes[0]])

    def prefix(n):
        return lambda arrays: fn(*(None if a is None else jax.lax.slice_in_dim(a, 0, n, axis=axis)
                                   for a, axis in zip(arrays, axes)))

    if len(lengths) == 1:
        return fn(*arrays)
    index = jnp.minimum(jnp.searchsorted(jnp.asarray(lengths), key_fill), len(lengths) - 1)
    return jax.lax.switch(index, [prefix(n) for n in lengths], tuple(arrays))


def prefix_lengths(keys: int, smallest: int = 16) -> tuple[int, ...]:
    """The key lengths a filling cache of ``keys`` slots is read at: powers of two from ``smallest``
    below ``keys``, then ``keys`` (at most 2x the filled slots are read, with few compiled branches)."""
    lengths = []
    while smallest < keys:
        lengths.append(smallest)
        smallest *= 2
    return (*lengths, keys)


def _mask(q_pos, k_pos, q_seg, k_seg, causal):
    """(B, Tq, Tk) boolean mask from the compact descriptors."""
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    if causal:
        mask &= k_pos[:, None, :] <= q_pos[:, :, None]
    return mask


def _xla_chunked(q, kh, vh, q_pos, k_pos, q_seg, k_seg, causal, scale, extra_values, q_chunk):
    """q (B, Tq, N, D) over head-major kh, vh (B, K, Tk, D)."""
    b, tq, n, d = q.shape
    kv = kh.shape[1]
    qh = jnp.moveaxis(q.reshape(b, tq, kv, n // kv, d), 1, 3)  # (B, K, G, Tq, D)
    # Every length is chunked: equal chunks of at most q_chunk queries; the padded tail queries have
    # segment 0 (they see nothing) and are dropped.
    num = -(-tq // q_chunk)
    size = -(-tq // num)
    pad = num * size - tq
    qh = jnp.pad(qh, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    q_pos, q_seg = (jnp.pad(a, ((0, 0), (0, pad))) for a in (q_pos, q_seg))
    channels = 0 if extra_values is None else extra_values.shape[-1]
    ev = jnp.zeros((b, kh.shape[2], 0), jnp.float32) if extra_values is None else extra_values.astype(jnp.float32)
    out, extra = _flash(causal, scale, size, qh, kh, vh, ev, q_pos, k_pos, q_seg, k_seg)
    out = out[:, :, :, :tq]
    return jnp.moveaxis(out, 3, 1).reshape(b, tq, n, d), (extra[:, :tq] if channels else None)


def _chunks(a, axis, size):
    """Splits ``axis`` into chunks of ``size`` along a new leading axis."""
    num = a.shape[axis] // size
    return jnp.moveaxis(a.reshape(*a.shape[:axis], num, size, *a.shape[axis + 1:]), axis, 0)


def _unchunk(a, axis):
    """Inverse of :func:`_chunks` (``axis`` counted without the leading chunk axis)."""
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(*a.shape[:axis], a.shape[axis] * a.shape[axis + 1], *a.shape[axis + 2:])


def _probabilities(q, k, q_pos, k_pos, q_seg, k_seg, causal, scale):
    """Masked logits (B, K, G, c, Tk) in float32 and the mask's per-query 'sees a key' (B, c)."""
    logits = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    mask = _mask(q_pos, k_pos, q_seg, k_seg, causal)
    return jnp.where(mask[:, None, None], logits, _MASK_VALUE), jnp.any(mask, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(causal, scale, size, q, k, v, ev, q_pos, k_pos, q_seg, k_seg):
    """Attention of head-major q (B, K, G, Tq, D) over k, v (B, K, Tk, D), one chunk of ``size``
    queries at a time, with the extra channels ev (B, Tk, C) summed over heads.

    A hand-written backward (flash-attention style): forward keeps only the outputs and each query's
    log-sum-exp, backward recomputes one chunk's probabilities at a time. Memory is linear in the
    length and no chunk's forward is run twice (as ``jax.checkpoint`` of the chunk would).
    """
    return _flash_forward(causal, scale, size, q, k, v, ev, q_pos, k_pos, q_seg, k_seg)[0]


def _flash_forward(causal, scale, size, q, k, v, ev, q_pos, k_pos, q_seg, k_seg):
    def one(args):
        qc, pc, sc = args
        logits, seen = _probabilities(qc, k, pc, k_pos, sc, k_seg, causal, scale)
        top = jnp.max(logits, axis=-1, keepdims=True)
        unnormalised = jnp.exp(logits - top)
        total = jnp.sum(unnormalised, axis=-1, keepdims=True)
        probs = unnormalised / total
        # A query that sees no key got a uniform softmax over masked logits: its outputs are zeroed.
        out = jnp.einsum("bkgqs,bksd->bkgqd", probs.astype(v.dtype), v)
        out = jnp.where(seen[:, None, None, :, None], out, 0.0).astype(v.dtype)
        extra = jnp.einsum("bqs,bsc->bqc", jnp.sum(probs, axis=(1, 2)), ev)
        extra = jnp.where(seen[..., None], extra, 0.0)
        # Named so that remat policies can keep them (layers.REMAT_POLICIES "attention"): the backward
        # then needs no second flash forward.
        lse = checkpoint_name((top + jnp.log(total))[..., 0], ATTENTION_NAME)
        return checkpoint_name(out, ATTENTION_NAME), checkpoint_name(extra, ATTENTION_NAME), lse

    out, extra, lse = jax.lax.map(one, (_chunks(q, 3, size), _chunks(q_pos, 1, size), _chunks(q_seg, 1, size)))
    out, extra, lse = _unchunk(out, 3), _unchunk(extra, 1), _unchunk(lse, 3)
    return (out, extra), (q, k, v, ev, q_pos, k_pos, q_seg, k_seg, out, extra, lse)


def _flash_backward(causal, scale, size, residuals, cotangents):
    q, k, v, ev, q_pos, k_pos, q_seg, k_seg, out, extra, lse = residuals
    d_out, d_extra = cotangents

    # The four big matmuls take their operands in the compute dtype and accumulate in float32, as flash
    # kernels do (float32 operands would run several MXU passes in a bf16 model); softmax statistics stay float32.
    mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def one(acc, args):
        dk, dv, dev = acc
        qc, pc, sc, oc, ec, lc, doc, dec = args
        logits, seen = _probabilities(qc, k, pc, k_pos, sc, k_seg, causal, scale)
        probs = jnp.exp(logits - lc[..., None])
        doc = jnp.where(seen[:, None, None, :, None], doc, 0).astype(v.dtype)
        dec = jnp.where(seen[..., None], dec, 0).astype(jnp.float32)
        dv = dv + mm("bkgqs,bkgqd->bksd", probs.astype(v.dtype), doc)
        dev = dev + jnp.einsum("bqs,bqc->bsc", jnp.sum(probs, axis=(1, 2)), dec)
        d_probs = mm("bkgqd,bksd->bkgqs", doc, v)
        d_probs += jnp.einsum("bqc,bsc->bqs", dec, ev)[:, None, None]
        # rowsum(P * dP): the value outputs' part from O, the extra channels' part per head from P ev
        per_head_extra = jnp.einsum("bkgqs,bsc->bkgqc", probs, ev)
        delta = jnp.sum(doc.astype(jnp.float32) * oc.astype(jnp.float32), -1) \
            + jnp.einsum("bkgqc,bqc->bkgq", per_head_extra, dec)
        d_logits = (probs * (d_probs - delta[..., None]) * scale).astype(q.dtype)
        dq = mm("bkgqs,bksd->bkgqd", d_logits, k)
        dk = dk + mm("bkgqs,bkgqd->bksd", d_logits, qc)
        return (dk, dv, dev), dq.astype(q.dtype)

    zeros = tuple(jnp.zeros(a.shape, jnp.float32) for a in (k, v, ev))
    xs = (_chunks(q, 3, size), _chunks(q_pos, 1, size), _chunks(q_seg, 1, size), _chunks(out, 3, size),
          _chunks(extra, 1, size), _chunks(lse, 3, size), _chunks(d_out, 3, size), _chunks(d_extra, 1, size))
    (dk, dv, dev), dq = jax.lax.scan(one, zeros, xs)
    return (_unchunk(dq, 3), dk.astype(k.dtype), dv.astype(v.dtype), dev, None, None, None, None)


_flash.defvjp(_flash_forward, _flash_backward)


_CUDNN_LENGTH_MULTIPLE = 64


def _pad_length(a: jax.Array, multiple: int) -> jax.Array:
    extra = -a.shape[1] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[1] = (0, extra)
    return jnp.pad(a, widths)


def _dot_product(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, extra_values, implementation, structured):
    if implementation == "cudnn":
        # cuDNN's fused kernels take only some sequence lengths (e.g. not 729 image keys): pad queries and
        # keys to a multiple of 64; padded keys have segment 0 (never seen), padded queries are dropped.
        tq = q.shape[1]
        q, q_pos, q_seg = (_pad_length(a, _CUDNN_LENGTH_MULTIPLE) for a in (q, q_pos, q_seg))
        k, v, k_pos, k_seg = (_pad_length(a, _CUDNN_LENGTH_MULTIPLE) for a in (k, v, k_pos, k_seg))
        if extra_values is not None:
            extra_values = _pad_length(extra_values, _CUDNN_LENGTH_MULTIPLE)
        out, extra = _dot_product_padded(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, extra_values,
                                         implementation, structured)
        return out[:, :tq], (None if extra is None else extra[:, :tq])
    return _dot_product_padded(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, extra_values, implementation,
                               structured)


def _dot_product_padded(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, extra_values, implementation,
                        structured):
    d = q.shape[-1]
    if structured:
        mask = None
        is_key = k_seg != 0
        # a query sees a key iff it is real and some real key is at or (when causal) before its index
        sees_any = jnp.cumsum(is_key, axis=1) > 0 if causal else jnp.any(is_key, axis=1, keepdims=True)
        seen = (q_seg != 0) & sees_any
    else:
        mask = _mask(q_pos, k_pos, q_seg, k_seg, causal)
        seen = jnp.any(mask, axis=-1)
    channels = 0 if extra_values is None else extra_values.shape[-1]
    if channels or structured:
        # Queries and keys are padded with zeros to one head size (a multiple of 8 for cuDNN), which leaves
        # q.k unchanged: the values' extra group carries the router rows, and with structure the first
        # padded q/k channel is the exclusion channel (query 1, key _EXCLUDE_KEY at non-keys, else 0).
        width = -(-(d + max(channels, int(structured))) // 8) * 8
        pad = width - d
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, pad)))
        if structured:
            q = q.at[..., d].set(1)
            k = k.at[..., d].set(jnp.where(is_key, 0.0, _EXCLUDE_KEY)[:, :, None].astype(k.dtype))
        shared = jnp.zeros((*v.shape[:3], 0), v.dtype) if extra_values is None else jnp.broadcast_to(
            extra_values.astype(v.dtype)[:, :, None, :], (*v.shape[:3], channels))
        v = jnp.concatenate([v, shared, jnp.zeros((*v.shape[:3], pad - channels), v.dtype)], axis=-1)
    out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], scale=scale,
                                       is_causal=structured and causal, implementation=implementation)
    out = jnp.where(seen[:, :, None, None], out, 0.0)
    extra = None if not channels else jnp.sum(out[..., d:d + channels].astype(jnp.float32), axis=2)
    return out[..., :d], extra


_SPLASH_BLOCKS = (512, 256, 128)  # the kernel's tiles: multiples of 128 lanes; the largest that divides a length


def _splash(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale, extra_values):
    """q (B, Tq, N, D) over k, v (B, Tk, K, D) with the splash kernel, one call per shard of the mesh."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, tq, n, d = q.shape
    tk, kv = k.shape[1], k.shape[2]
    # The masked-row rule (a query that sees no key gets 0) from the descriptors: one fused reduction.
    seen = jnp.any(_mask(q_pos, k_pos, q_seg, k_seg, causal), axis=-1)
    channels = 0 if extra_values is None else extra_values.shape[-1]
    if channels:
        v = jnp.concatenate([v, jnp.broadcast_to(extra_values.astype(v.dtype)[:, :, None, :], (b, tk, kv, channels))],
                            axis=-1)
    # The kernel's segment rule is q_id == kv_id; ours also needs a key (segment != 0): queries of segment 0
    # (padding) get -1, so they match nothing either. Lengths are padded to the kernel's tiles.
    tq_p, tk_p = -(-tq // 128) * 128, -(-tk // 128) * 128
    q_ids = jnp.pad(jnp.where(q_seg == 0, -1, q_seg), ((0, 0), (0, tq_p - tq)), constant_values=-1)
    k_ids = jnp.pad(k_seg, ((0, 0), (0, tk_p - tk)))
    g = n // kv
    # (B, K, G, T, D): one kernel call per batch row and key/value head, over its G query heads
    qh = jnp.moveaxis(_pad_length((q * scale).astype(q.dtype), 128).reshape(b, tq_p, kv, g, d), 1, 3)
    kh, vh = (jnp.moveaxis(_pad_length(a, 128), 1, 2) for a in (k, v))
    bq = next(s for s in _SPLASH_BLOCKS if tq_p % s == 0)
    bkv = next(s for s in _SPLASH_BLOCKS if tk_p % s == 0)
    mask = splash.CausalMask((tq_p, tk_p)) if causal else splash.FullMask((tq_p, tk_p))

    def per_shard(qh, kh, vh, q_ids, k_ids):
        kernel = splash.make_splash_mqa(
            splash.MultiHeadMask([mask] * g), head_shards=1, q_seq_shards=1,
            block_sizes=splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                          block_kv_dkv=bkv, block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True),
            residual_checkpoint_name=ATTENTION_NAME, interpret=sharding.platform() != "tpu")
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over the K key/value heads
        return jax.vmap(lambda q, k, v, qi, ki: per_head(q, k, v, splash.SegmentIds(qi, ki)))(
            qh, kh, vh, q_ids, k_ids)

    out = sharding.per_shard(per_shard, (qh, kh, vh, q_ids, k_ids),
                             (("act_batch", "act_kv_heads"),) * 3 + (("act_batch",),) * 2)
    out = jnp.moveaxis(out, 3, 1).reshape(b, tq_p, n, d + channels)[:, :tq]
    out = jnp.where(seen[:, :, None, None], out, 0)
    extra = jnp.sum(out[..., d:].astype(jnp.float32), axis=2) if channels else None
    return out[..., :d], extra
