"""Checksums of saved arrays, computed on the devices from the arrays themselves.

An array's checksum is the sum (mod 2**32) over its elements of a hash of (flat index, bit pattern). Integer
addition is exact and order-free, so the value does not depend on how the array is sharded or on how many
processes save or restore it, and every process of a restore gets the same verdict (the sum is one global
reduction). It costs one fused pass over device memory when a step is saved and when it is restored: no host
copy and no reading the files back after orbax finalises them, so asynchronous saves stay asynchronous.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "wings_jax/sum32-murmur3/1"
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _mix(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: every input bit reaches every output bit."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _array_checksum(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    bits = x.astype(jnp.uint32) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize])
    index = jnp.zeros(x.shape, jnp.uint32)  # the flat index (mod 2**32): moved values change the sum too
    for axis, size in enumerate(x.shape):
        index = index * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    return jnp.sum(_mix(bits.astype(jnp.uint32) ^ _mix(index + np.uint32(0x9E3779B9))), dtype=jnp.uint32)


_leaf_checksums = jax.jit(lambda leaves: [_array_checksum(x) for x in leaves])


def path_name(path: tuple) -> str:
    """A PyTree key path as '/'-joined keys (``llm/layers/attn/q/kernel``)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def checksums(tree: Any) -> dict[str, int]:
    """``{'/'-joined path: checksum}`` of every array of ``tree``."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = jax.device_get(_leaf_checksums([leaf for _, leaf in named]))
    return {path_name(path): int(value) for (path, _), value in zip(named, values)}


def mismatches(tree: Any, expected: Mapping[str, int]) -> list[str]:
    """Paths whose arrays differ from ``expected`` (present in only one of the two counts as differing)."""
    actual = checksums(tree)
    return sorted(k for k in actual.keys() | expected.keys() if actual.get(k) != expected.get(k))
