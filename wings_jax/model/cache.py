"""The decode cache and the key description every attention of one model call shares.

A cache has one slot per position: slot s of row b holds the keys and values of position s. A model
call builds one :class:`AttentionInputs` from its tokens' positions and segments (and the cache, if
any); every layer's attention, and the Wings learners, read their query and key descriptors there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from wings_jax.model.layers import Rotary


@struct.dataclass
class DecodeCache:
    """Keys and values of every layer for incremental decoding; slot s of row b holds position s.

    ``layers`` maps names ('k', 'v', and the Wings learners' own) to arrays (layers, B, heads, S, head_dim):
    heads before slots, the layout the attention reads, so a step transposes no cached keys. A model whose
    layers are separate modules (``layers.unstacked``, how inference runs) keeps a tuple of per-layer arrays
    (B, heads, S, head_dim) instead: each layer reads and updates its own buffer in place, never a slice
    copied out of a stacked one.
    ``segments`` is 0 for empty slots. ``learners`` holds per-sequence metadata of the Wings learners.

    Layout convention (what :func:`grown` relies on; every buffer added must follow it): in ``layers`` and
    ``learners``, a name starting with ``image_`` is per image token (its image-token axis where the others
    have their slot axis): sized at prefill, grown when ``WingsModel.extend`` appends images; every other array
    of ``layers`` has its slot axis at -2, every other array of ``learners`` is (B, S, ...).
    """

    layers: dict[str, jax.Array]
    positions: jax.Array  # (B, S)
    segments: jax.Array  # (B, S)
    learners: dict[str, jax.Array] = struct.field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return self.positions.shape[1]

    @property
    def image_tokens(self) -> int:
        """Entries of the image-token axis (0 without the Wings learners' image arrays)."""
        segments = self.learners.get("image_segments")
        return 0 if segments is None else segments.shape[1]


def grown(cache: DecodeCache, max_length: int, image_tokens: int | None = None) -> DecodeCache:
    """A copy of ``cache`` with ``max_length`` slots and ``image_tokens`` image-token entries (each at least its
    own; None keeps the image arrays' size); the new slots and entries are empty (zeros, as in a fresh cache:
    segment 0)."""
    extra = max_length - cache.max_length
    extra_images = 0 if image_tokens is None else image_tokens - cache.image_tokens
    if extra < 0 or extra_images < 0:
        raise ValueError(f"cannot shrink a cache of {cache.max_length} slots and {cache.image_tokens} image tokens "
                         f"to {max_length} and {image_tokens}")

    def pad(array: jax.Array, axis: int, amount: int) -> jax.Array:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, amount)
        return jnp.pad(array, widths)

    def padded(arrays: dict[str, jax.Array], axis: int) -> dict[str, jax.Array]:
        # image arrays grow along their image-token axis, at the same place as the others' slot axis;
        # jax.tree.map: a stacked array or a tuple of per-layer ones
        return {name: jax.tree.map(lambda x: pad(x, axis, extra_images if name.startswith("image_") else extra), a)
                for name, a in arrays.items()}

    return cache.replace(layers=padded(cache.layers, -2), positions=pad(cache.positions, 1, extra),
                         segments=pad(cache.segments, 1, extra), learners=padded(cache.learners, 1))


@struct.dataclass
class AttentionInputs:
    """What the main attention of every layer needs besides q/k/v, built once per model call.

    Queries are the call's tokens; keys are the same tokens without a cache, or every cache slot
    (the call's tokens written in) with one. Segment 0 marks padding / an empty slot.
    """

    positions: jax.Array  # (B, T) queries' positions (RoPE and causality)
    segments: jax.Array  # (B, T)
    key_positions: jax.Array  # (B, S)
    key_segments: jax.Array  # (B, S)
    slots: jax.Array | None = None  # (B, T) cache slot of each query token; None without a cache
    key_groups: jax.Array | None = None  # (B, S, G) groups whose attention mass the layers report
    key_fill: jax.Array | None = None  # () with a cache: no query sees a slot >= key_fill (causal, slot = position)
    rope: Rotary | None = None  # RoPE tables at ``positions``, built once per call by ``Qwen2.run_layers``

    @classmethod
    def build(cls, positions: jax.Array, segments: jax.Array, cache: DecodeCache | None = None,
              key_groups: jax.Array | None = None) -> "AttentionInputs":
        if cache is None:
            return cls(positions, segments, positions, segments, key_groups=key_groups)
        # slot = position; padding tokens go past the end, where writes are dropped
        slots = jnp.where(segments != 0, positions, cache.max_length)
        key_fill = jnp.max(jnp.where(segments != 0, positions + 1, 0))
        return cls(positions, segments, write_slots(cache.positions, positions, slots),
                   write_slots(cache.segments, segments, slots), slots, key_groups, key_fill)

    def keys(self, values: jax.Array, cached: jax.Array | None) -> jax.Array:
        """A per-token array (B, T) as a per-key one: ``values`` written over the ``cached`` slots (B, S)
        with a cache (``cached`` None: an empty cache), ``values`` itself without."""
        if self.slots is None:
            return values
        return write_slots(jnp.zeros_like(self.key_positions) if cached is None else cached, values, self.slots)


def write_slots(buffer: jax.Array, values: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer (B, S, ...)[b, slots[b, t]] = values (B, T, ...); slots past the end are dropped."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")


class CacheView:
    """One layer's view of the cache buffers, carried through the layers.

    Writes go straight into this layer's part: at its index of a stacked (layers, ...) array (a traced
    index inside the layer scan), or its own array of a per-layer tuple (a Python index in an unrolled
    loop), so a decode step writes only its new slots instead of copying every layer's cache.
    """

    def __init__(self, arrays: dict[str, jax.Array | tuple[jax.Array, ...]], layer: jax.Array | int):
        self.arrays, self.layer = dict(arrays), layer

    def read(self, name: str) -> jax.Array:
        return self.arrays[name][self.layer]

    def write_slots(self, name: str, values: jax.Array, slots: jax.Array) -> jax.Array:
        """Writes values (B, T, heads, D) at slots (B, T) of this layer's (B, heads, S, D) buffer; returns
        the layer's updated buffer."""
        rows = jnp.arange(values.shape[0])[:, None]
        # the slice between the advanced indices puts their (B, T) first: the update is values as given
        return self._set(name, (rows, slice(None), slots), values)

    def write_layer(self, name: str, values: jax.Array) -> None:
        """Stores values (B, M, heads, D) as this layer's (B, heads, M, D) buffer."""
        self._set(name, (Ellipsis,), jnp.swapaxes(values, 1, 2))

    def _set(self, name: str, index: tuple, values: jax.Array) -> jax.Array:
        """``buffer[index] = values`` in this layer's part of buffer ``name``; returns that part."""
        buffer = self.arrays[name]
        if isinstance(buffer, tuple):
            i = int(self.layer)
            layer = buffer[i].at[index].set(values.astype(buffer[i].dtype), mode="drop")
            self.arrays[name] = (*buffer[:i], layer, *buffer[i + 1:])
        else:
            self.arrays[name] = buffer.at[(self.layer, *index)].set(values.astype(buffer.dtype), mode="drop")
        return self.read(name)
